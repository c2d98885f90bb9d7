package dev.comigs.edge.core;

import dev.comigs.sync.v1.DeviceCapabilities;
import io.grpc.Status;
import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.TreeMap;
import java.util.function.Consumer;

/**
 * The device's round loop: register, ask for a task, download the generalist, train locally, upload the
 * generalist delta, repeat, until the coordinator says DONE or {@code maxRounds} rounds were uploaded.
 *
 * <p>Crash safety (the app may be killed at any instant): the encoded payload is written durably first,
 * then the round's idempotency key is persisted in the state file, and only then does the upload start. At
 * start-up every persisted, unacknowledged upload is re-sent byte for byte under its key, so the
 * coordinator counts it once (it answers a repeat with the original acknowledgement, duplicate = true).
 */
public final class RoundLoop {
  /** Settings of the loop. */
  public static final class Options {
    public Encoding encoding = Encoding.FP32;
    /** Optional: the encoding of the n-th uploaded round of this run, cycling (tests, benchmarks). */
    public List<Encoding> encodingSchedule = List.of();
    /** Stop after this many uploaded rounds (0: until DONE). */
    public int maxRounds;
    public long maxPollMs = 60_000;
    /** Give up waiting after this long without a task (0: never). */
    public long idleTimeoutMs;
    /** Artifacts to verify against their manifest before every training round (null: none). */
    public Path artifactDir;
    public List<String> artifacts = List.of();
    public DeviceCapabilities capabilities = DeviceCapabilities.newBuilder()
        .setNumExperts(2).setNumGeneralists(1).setLoraRank(8).setRuntime("android-executorch").build();
  }

  /** Test-only hooks called at named points of an upload ("before_upload", "after_ack"). */
  public interface Hooks {
    void at(String point, long roundId);
  }

  private final SyncClient client;
  private final DeviceState state;
  private final LocalTrainer trainer;
  private final Options options;
  private final Consumer<Map<String, Object>> events;
  private final Hooks hooks;

  public RoundLoop(SyncClient client, DeviceState state, LocalTrainer trainer, Options options,
      Consumer<Map<String, Object>> events, Hooks hooks) {
    this.client = client;
    this.state = state;
    this.trainer = trainer;
    this.options = options;
    this.events = events != null ? events : e -> { };
    this.hooks = hooks != null ? hooks : (p, r) -> { };
  }

  private void emit(String event, Object... fields) {
    Map<String, Object> e = new LinkedHashMap<>();
    e.put("event", event);
    for (int i = 0; i + 1 < fields.length; i += 2) {
      e.put((String) fields[i], fields[i + 1]);
    }
    events.accept(e);
  }

  /** Run until DONE / maxRounds; returns the number of rounds uploaded in this run. */
  public int run() throws Exception {
    if (options.artifactDir != null) {
      verifyArtifacts();
    }
    client.register(options.capabilities);
    if (state.deviceId().isEmpty()) {
      state.setDeviceId(client.deviceId());
      state.save();
    }
    emit("registered", "device", client.deviceId());
    int uploaded = resumePending();
    long idleSince = System.currentTimeMillis();
    while (options.maxRounds == 0 || uploaded < options.maxRounds) {
      SyncClient.Task task = client.getTask();
      if (task.action.equals("done")) {
        emit("done", "message", task.message);
        return uploaded;
      }
      DeviceState.Upload existing = state.upload(task.roundId);
      // A round this device already has an entry for (acknowledged, pending or abandoned) is never
      // trained again: one upload per device per round, and the key of a round never changes.
      boolean train = task.action.equals("train") && !task.alreadyUploaded && existing == null;
      if (!train) {
        if (options.idleTimeoutMs > 0 && System.currentTimeMillis() - idleSince > options.idleTimeoutMs) {
          throw new ComigsException(ComigsException.Kind.UNAVAILABLE,
              "no task from the coordinator for " + options.idleTimeoutMs + " ms (last: " + task.action + ", "
                  + task.message + ")");
        }
        client.idle(Math.max(50, Math.min(task.retryAfterMs, options.maxPollMs)));
        continue;
      }
      trainAndUpload(task, uploaded);
      uploaded++;
      idleSince = System.currentTimeMillis();
    }
    return uploaded;
  }

  private void verifyArtifacts() throws ComigsException {
    ArtifactManifest manifest = ArtifactManifest.load(options.artifactDir);
    manifest.verify(options.artifacts);
    emit("artifacts_verified", "dir", options.artifactDir.toString(), "export_id", manifest.exportId());
  }

  /** Re-send every persisted, unacknowledged upload (after a crash); returns how many were acknowledged. */
  int resumePending() throws Exception {
    int acknowledged = 0;
    for (DeviceState.Upload upload : state.pendingUploads()) {
      Path file = state.directory().resolve(upload.payloadFile);
      byte[] payload;
      try {
        payload = Files.readAllBytes(file);
      } catch (IOException ex) {
        throw new ComigsException(ComigsException.Kind.STATE_CORRUPT, "the pending upload of round "
            + upload.roundId + " lost its payload file " + file + " (" + ex.getMessage() + "); state left untouched");
      }
      if (!AtomicFiles.sha256Hex(payload).equals(upload.payloadSha256)) {
        throw new ComigsException(ComigsException.Kind.STATE_CORRUPT, "the pending upload of round "
            + upload.roundId + ": " + file + " does not match its recorded sha256; state left untouched");
      }
      emit("resume_upload", "round", upload.roundId, "key", upload.key);
      try {
        SyncClient.UploadResult result = client.uploadEncoded(upload.roundId, upload.baseVersion, payload,
            upload.numSamples, Encoding.fromName(upload.encoding), upload.key);
        acknowledge(upload, result);
        acknowledged++;
      } catch (SyncClient.SyncException ex) {
        if (ex.code == Status.Code.FAILED_PRECONDITION || ex.code == Status.Code.ALREADY_EXISTS) {
          upload.status = "abandoned";
          upload.reason = ex.getMessage();
          state.save();
          Files.deleteIfExists(file);
          emit("upload_abandoned", "round", upload.roundId, "reason", ex.getMessage());
        } else {
          throw ex; // transient or auth: keep everything for the next start
        }
      }
    }
    return acknowledged;
  }

  private void acknowledge(DeviceState.Upload upload, SyncClient.UploadResult result) throws IOException {
    hooks.at("after_ack", upload.roundId);
    upload.acknowledged = true;
    upload.status = "acknowledged";
    upload.uploadId = result.uploadId;
    upload.duplicate = result.duplicate;
    state.incrementRoundsCompleted();
    state.save();
    Files.deleteIfExists(state.directory().resolve(upload.payloadFile));
    emit("uploaded", "round", upload.roundId, "upload_id", result.uploadId, "duplicate", result.duplicate,
        "round_uploads", result.roundUploads, "update_norm", result.updateNorm, "key", upload.key);
  }

  /** The generalist of a version: the verified local copy, or a fresh download stored durably. */
  Map<String, Tensor> generalist(long version) throws Exception {
    if (state.generalistVersion() == version && !state.generalistFile().isEmpty()) {
      Path file = state.directory().resolve(state.generalistFile());
      if (Files.isRegularFile(file) && AtomicFiles.sha256Hex(file).equals(state.generalistSha256())) {
        return TensorPayload.decode(Files.readAllBytes(file));
      }
      emit("generalist_cache_invalid", "file", file.toString());
    }
    SyncClient.Generalist downloaded = client.downloadGeneralist(version);
    String relative = String.format("generalists/v%06d.safetensors", downloaded.version);
    AtomicFiles.write(state.directory().resolve(relative), downloaded.payload);
    String previous = state.generalistFile();
    state.setGeneralist(downloaded.version, downloaded.sha256, relative);
    state.save();
    if (!previous.isEmpty() && !previous.equals(relative)) {
      Files.deleteIfExists(state.directory().resolve(previous));
    }
    emit("downloaded", "version", downloaded.version, "bytes", downloaded.payload.length, "sha256", downloaded.sha256);
    return TensorPayload.decode(downloaded.payload);
  }

  private void trainAndUpload(SyncClient.Task task, int index) throws Exception {
    if (options.artifactDir != null) {
      verifyArtifacts(); // a file may have been replaced since start-up: never train on it
    }
    Map<String, Tensor> base = generalist(task.generalistVersion);
    Deltas.checkManifest(base, task.manifest, "the downloaded generalist");
    Map<String, Tensor> copy = new TreeMap<>(Json.CODE_POINT_ORDER);
    for (Map.Entry<String, Tensor> e : base.entrySet()) {
      copy.put(e.getKey(), e.getValue().copy());
    }
    emit("training", "round", task.roundId, "base_version", task.generalistVersion);
    client.hangUp(); // nothing to exchange until the delta is ready: the upload reconnects
    LocalTrainer.Result result = trainer.train(task.roundId, copy, task.localConfig);
    if (result.numSamples < 1) {
      throw new ComigsException(ComigsException.Kind.INVALID, "the trainer reported no training samples");
    }
    Map<String, Tensor> delta = Deltas.compute(base, result.generalist, task.manifest);
    Encoding encoding = options.encodingSchedule.isEmpty() ? options.encoding
        : options.encodingSchedule.get(index % options.encodingSchedule.size());
    if (!task.acceptedEncodings.isEmpty() && !task.acceptedEncodings.contains(encoding)) {
      encoding = task.acceptedEncodings.contains(Encoding.FP32) ? Encoding.FP32 : task.acceptedEncodings.get(0);
    }
    byte[] payload = TensorPayload.encode(delta, encoding);
    if (task.maxUploadBytes > 0 && payload.length > task.maxUploadBytes) {
      throw new ComigsException(ComigsException.Kind.INVALID, "the delta is " + payload.length
          + " bytes, the coordinator accepts at most " + task.maxUploadBytes + "; use int8");
    }
    // 1. the payload, durably; 2. the key, durably; 3. only then the upload.
    DeviceState.Upload upload = new DeviceState.Upload();
    upload.roundId = task.roundId;
    upload.baseVersion = task.generalistVersion;
    upload.key = DeviceState.newKey(client.deviceId(), task.roundId);
    upload.encoding = encoding.wireName;
    upload.numSamples = result.numSamples;
    upload.payloadFile = String.format("pending/round-%06d.%s.payload", task.roundId, encoding.wireName);
    upload.payloadSha256 = AtomicFiles.sha256Hex(payload);
    AtomicFiles.write(state.directory().resolve(upload.payloadFile), payload);
    state.putUpload(upload);
    Map<String, Object> metrics = new TreeMap<>();
    if (result.trainLoss != null) {
      metrics.put("train_loss", result.trainLoss);
    }
    if (result.validLoss != null) {
      metrics.put("valid_loss", result.validLoss);
      metrics.put("perplexity", Math.exp(result.validLoss));
    }
    metrics.put("round", task.roundId);
    state.setLastMetrics(metrics);
    state.save();
    emit("key_persisted", "round", task.roundId, "key", upload.key, "bytes", payload.length,
        "payload_file", state.directory().resolve(upload.payloadFile).toString(),
        "encoding", encoding.wireName, "num_samples", result.numSamples);
    hooks.at("before_upload", task.roundId);
    SyncClient.UploadResult ack = client.uploadEncoded(task.roundId, task.generalistVersion, payload,
        result.numSamples, encoding, upload.key);
    acknowledge(upload, ack);
    try {
      client.reportMetrics(task.roundId, result.trainLoss, result.validLoss,
          result.validLoss != null ? Math.exp(result.validLoss) : null, result.stepTimeS,
          result.peakMemoryBytes, result.localSteps);
    } catch (SyncClient.SyncException ex) {
      emit("metrics_not_reported", "reason", ex.getMessage()); // operator telemetry only: never fatal
    }
  }
}
