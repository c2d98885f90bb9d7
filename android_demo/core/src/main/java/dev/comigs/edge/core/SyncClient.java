package dev.comigs.edge.core;

import com.google.protobuf.ByteString;
import dev.comigs.sync.v1.AcquireUploadSlotRequest;
import dev.comigs.sync.v1.AcquireUploadSlotResponse;
import dev.comigs.sync.v1.Action;
import dev.comigs.sync.v1.Chunk;
import dev.comigs.sync.v1.DeviceCapabilities;
import dev.comigs.sync.v1.DownloadGeneralistRequest;
import dev.comigs.sync.v1.DownloadGeneralistResponse;
import dev.comigs.sync.v1.GetTaskRequest;
import dev.comigs.sync.v1.GetTaskResponse;
import dev.comigs.sync.v1.RegisterDeviceRequest;
import dev.comigs.sync.v1.RegisterDeviceResponse;
import dev.comigs.sync.v1.ReportMetricsRequest;
import dev.comigs.sync.v1.SyncServiceGrpc;
import dev.comigs.sync.v1.TensorSpec;
import dev.comigs.sync.v1.UploadDeltaRequest;
import dev.comigs.sync.v1.UploadDeltaResponse;
import dev.comigs.sync.v1.UploadHeader;
import io.grpc.ChannelCredentials;
import io.grpc.ClientInterceptor;
import io.grpc.Grpc;
import io.grpc.InsecureChannelCredentials;
import io.grpc.ManagedChannel;
import io.grpc.ManagedChannelBuilder;
import io.grpc.Metadata;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.TlsChannelCredentials;
import io.grpc.stub.ClientCallStreamObserver;
import io.grpc.stub.ClientResponseObserver;
import io.grpc.stub.MetadataUtils;
import java.io.ByteArrayInputStream;
import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.net.InetAddress;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.EnumSet;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Random;
import java.util.Set;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.TimeUnit;

/**
 * The device side of comigs.sync.v1 (the Java twin of edge_runtime/sync_client.py).
 *
 * <p>TLS by default (a private CA's PEM, or the platform's roots); {@code insecure} only for loopback
 * targets, because the bearer token would travel in plaintext. Every call carries {@code authorization:
 * Bearer <token>} and, when known, {@code x-comigs-device-id}. Transient failures (UNAVAILABLE,
 * DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED) are retried with jittered exponential backoff; everything
 * else fails at once. Downloads resume from the last byte received and are checked against the announced
 * SHA-256. Uploads send one header and 64 KiB chunks, with flow control.
 */
public final class SyncClient implements AutoCloseable {
  public static final Set<Status.Code> TRANSIENT =
      EnumSet.of(
          Status.Code.UNAVAILABLE,
          Status.Code.DEADLINE_EXCEEDED,
          Status.Code.RESOURCE_EXHAUSTED,
          Status.Code.ABORTED);
  public static final int DEFAULT_CHUNK_BYTES = 64 * 1024;
  /** Told to wait at least this long (slot, next round), the client hangs up until it asks again (as the Python client). */
  public static final long HANG_UP_WAIT_MS = 250;

  /** Connection settings. */
  public static final class Options {
    public String target;
    public String token;
    public String deviceId = "";
    /** PEM of the CA that signed the coordinator's certificate; null: the platform's trust store. */
    public byte[] caPem;
    /** Name checked in the certificate instead of the target's host. */
    public String serverName;
    public boolean insecure;
    public int chunkBytes = DEFAULT_CHUNK_BYTES;
    public long rpcTimeoutMs = 30_000;
    public long transferTimeoutMs = 600_000;
    public int maxAttempts = 6;
    public long initialBackoffMs = 500;
    public long maxBackoffMs = 30_000;
    public double backoffMultiplier = 2.0;
  }

  /** A call that failed for good. */
  public static final class SyncException extends ComigsException {
    public final String method;
    public final Status.Code code;
    public final String details;
    public final int attempts;

    SyncException(String method, Status.Code code, String details, int attempts) {
      super(kindOf(code), describe(method, code, details, attempts));
      this.method = method;
      this.code = code;
      this.details = details;
      this.attempts = attempts;
    }

    public boolean isTransient() {
      return TRANSIENT.contains(code);
    }

    private static Kind kindOf(Status.Code code) {
      if (code == Status.Code.UNAUTHENTICATED || code == Status.Code.PERMISSION_DENIED) {
        return Kind.AUTH;
      }
      if (TRANSIENT.contains(code)) {
        return Kind.UNAVAILABLE;
      }
      return Kind.REFUSED;
    }

    private static String describe(String method, Status.Code code, String details, int attempts) {
      String tries = attempts > 1 ? " after " + attempts + " attempts" : "";
      String hint = "";
      if (code == Status.Code.UNAVAILABLE) {
        hint = " (is the coordinator running and reachable? nothing was lost: run again later)";
      } else if (code == Status.Code.PERMISSION_DENIED) {
        hint = " (this device's token was revoked or names another device: ask the operator to "
            + "re-enrol it with `comigs sync add-device NAME --rotate`)";
      } else if (code == Status.Code.UNAUTHENTICATED) {
        hint = " (the device token is wrong or unknown: check the token file)";
      }
      return method + " failed" + tries + ": " + code + ": " + details + hint;
    }
  }

  /** GetTask's answer. */
  public static final class Task {
    public String action; // "train", "wait", "done"
    public long roundId;
    public String roundState;
    public long deadlineUnixMs;
    public long generalistVersion;
    public Map<String, Object> localConfig = new LinkedHashMap<>();
    public Map<String, long[]> manifest = new LinkedHashMap<>();
    public List<Encoding> acceptedEncodings = new ArrayList<>();
    public long maxUploadBytes;
    public long retryAfterMs;
    public boolean alreadyUploaded;
    public String message;
    public int minDevices;
    public int uploadsReceived;
  }

  /** A downloaded, verified generalist. */
  public static final class Generalist {
    public final long version;
    public final byte[] payload;
    public final String sha256;

    Generalist(long version, byte[] payload, String sha256) {
      this.version = version;
      this.payload = payload;
      this.sha256 = sha256;
    }
  }

  /** UploadDelta's acknowledgement. */
  public static final class UploadResult {
    public long roundId;
    public String uploadId;
    public boolean duplicate;
    public long acceptedBytes;
    public int roundUploads;
    public double updateNorm;
    public boolean clipped;
  }

  @FunctionalInterface
  private interface Attempt<T> {
    T run() throws Exception;
  }

  private final Options options;
  private final ChannelCredentials credentials;
  private final ClientInterceptor auth;
  /** The open channel, or null after a hang-up (the next call opens a new one: see hangUp). */
  private ManagedChannel channel;
  private SyncServiceGrpc.SyncServiceBlockingStub blocking;
  private SyncServiceGrpc.SyncServiceStub async;
  /** False once the coordinator answered UNIMPLEMENTED (one without upload admission). */
  private volatile boolean useSlots = true;
  private final Random random = new Random();
  private String deviceId;

  public SyncClient(Options options) throws ComigsException {
    if (options.token == null || options.token.isEmpty()) {
      throw new ComigsException(ComigsException.Kind.INVALID,
          "a device token is required (from `comigs sync add-device NAME`)");
    }
    if (options.chunkBytes < 1024 || options.chunkBytes > 4 * 1024 * 1024) {
      throw new ComigsException(ComigsException.Kind.INVALID,
          "chunk size must be between 1 KiB and 4 MiB (the coordinator's message limit)");
    }
    this.options = options;
    this.deviceId = options.deviceId == null ? "" : options.deviceId;
    if (options.insecure) {
      if (!isLoopback(options.target)) {
        throw new ComigsException(ComigsException.Kind.INVALID,
            "refusing an insecure channel to " + options.target + ": only loopback targets may skip TLS");
      }
      this.credentials = InsecureChannelCredentials.create();
    } else {
      TlsChannelCredentials.Builder tls = TlsChannelCredentials.newBuilder();
      if (options.caPem != null) {
        try {
          tls.trustManager(new ByteArrayInputStream(options.caPem));
        } catch (IOException | IllegalArgumentException ex) {
          throw new ComigsException(ComigsException.Kind.INVALID, "cannot read the CA certificate: " + ex.getMessage());
        }
      }
      this.credentials = tls.build();
    }
    Metadata metadata = new Metadata();
    metadata.put(Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER), "Bearer " + options.token);
    if (!deviceId.isEmpty()) {
      metadata.put(Metadata.Key.of("x-comigs-device-id", Metadata.ASCII_STRING_MARSHALLER), deviceId);
    }
    this.auth = MetadataUtils.newAttachHeadersInterceptor(metadata);
    open();
  }

  /** A new channel and its stubs; connects on its first call. */
  private void open() {
    ManagedChannelBuilder<?> builder = Grpc.newChannelBuilder(options.target, credentials)
        .maxInboundMessageSize(8 * 1024 * 1024)
        .keepAliveTime(30, TimeUnit.SECONDS)
        .keepAliveTimeout(10, TimeUnit.SECONDS);
    if (options.serverName != null && !options.serverName.isEmpty()) {
      builder.overrideAuthority(options.serverName);
    }
    channel = builder.build();
    blocking = SyncServiceGrpc.newBlockingStub(channel).withInterceptors(auth);
    async = SyncServiceGrpc.newStub(channel).withInterceptors(auth);
  }

  private synchronized SyncServiceGrpc.SyncServiceBlockingStub blocking() {
    if (channel == null) {
      open();
    }
    return blocking;
  }

  private synchronized SyncServiceGrpc.SyncServiceStub async() {
    if (channel == null) {
      open();
    }
    return async;
  }

  static boolean isLoopback(String target) {
    String host = target;
    if (host.startsWith("[")) {
      host = host.substring(1, host.indexOf(']'));
    } else if (host.chars().filter(c -> c == ':').count() == 1) {
      host = host.substring(0, host.indexOf(':'));
    }
    if (host.equals("localhost")) {
      return true;
    }
    if (!host.matches("[0-9.]+") && !host.contains(":")) {
      return false; // never resolve names here: only literal loopback addresses count
    }
    try {
      return InetAddress.getByName(host).isLoopbackAddress();
    } catch (IOException ex) {
      return false;
    }
  }

  public String deviceId() {
    return deviceId;
  }

  /**
   * Close the connection but keep the client usable: the next call reconnects (one TLS handshake).
   * Devices hang up while they train or wait: the coordinator holds ~65-200 KiB of TLS state per
   * open connection. Callers hang up between calls, never during one.
   *
   * <p>The channel is shut down and replaced, not sent idle: {@code enterIdle()} leaves the
   * connection to a graceful shutdown that, measured against the coordinator with grpc-java 1.41,
   * kept it open for seconds after the calls had ended (a device refused at the coordinator's
   * connection limit was then refused again and again because of its own lingering connection).
   */
  public synchronized void hangUp() {
    if (channel != null) {
      channel.shutdownNow();
      channel = null;
    }
  }

  /**
   * Wait with nothing to say, hanging up first if the wait is {@link #HANG_UP_WAIT_MS} or longer (the
   * next call reconnects): the coordinator then holds no connection state for this device meanwhile.
   */
  public void idle(long ms) throws InterruptedException {
    if (ms >= HANG_UP_WAIT_MS) {
      hangUp();
    }
    Thread.sleep(ms);
  }

  @Override
  public synchronized void close() {
    if (channel == null) {
      return;
    }
    channel.shutdownNow();
    try {
      channel.awaitTermination(5, TimeUnit.SECONDS);
    } catch (InterruptedException ex) {
      Thread.currentThread().interrupt();
    }
    channel = null;
  }

  private <T> T call(String method, Attempt<T> attempt) throws SyncException {
    int tries = 0;
    while (true) {
      tries++;
      Status status;
      try {
        return attempt.run();
      } catch (StatusRuntimeException ex) {
        status = ex.getStatus();
      } catch (ExecutionException ex) {
        status = Status.fromThrowable(ex.getCause());
      } catch (SyncException ex) {
        throw ex;
      } catch (InterruptedException ex) {
        Thread.currentThread().interrupt();
        throw new SyncException(method, Status.Code.CANCELLED, "interrupted", tries);
      } catch (Exception ex) {
        status = Status.fromThrowable(ex);
      }
      String details = status.getDescription() != null ? status.getDescription()
          : (status.getCause() != null ? status.getCause().toString() : status.getCode().toString());
      if (!TRANSIENT.contains(status.getCode()) || tries >= options.maxAttempts) {
        throw new SyncException(method, status.getCode(), details, tries);
      }
      if (status.getCode() == Status.Code.UNAVAILABLE) {
        // Drop the connection: the retry connects afresh after our backoff instead of failing fast
        // until the channel's own reconnect backoff has passed (a coordinator at its connection limit
        // closes new connections as they arrive).
        hangUp();
      }
      double ceiling = Math.min(options.maxBackoffMs, options.initialBackoffMs * Math.pow(options.backoffMultiplier, tries - 1));
      long pause = (long) (ceiling * (0.5 + 0.5 * random.nextDouble()));
      try {
        Thread.sleep(pause);
      } catch (InterruptedException ex) {
        Thread.currentThread().interrupt();
        throw new SyncException(method, Status.Code.CANCELLED, "interrupted", tries);
      }
    }
  }

  private static Map<String, long[]> manifestOf(List<TensorSpec> specs) {
    Map<String, long[]> out = new LinkedHashMap<>();
    for (TensorSpec spec : specs) {
      long[] shape = new long[spec.getShapeCount()];
      for (int i = 0; i < shape.length; i++) {
        shape[i] = spec.getShape(i);
      }
      out.put(spec.getName(), shape);
    }
    return out;
  }

  /** RegisterDevice; returns the manifest of exchanged tensors. */
  public Map<String, long[]> register(DeviceCapabilities capabilities) throws SyncException {
    RegisterDeviceRequest request =
        RegisterDeviceRequest.newBuilder().setDeviceId(deviceId).setCapabilities(capabilities).build();
    RegisterDeviceResponse response = call("RegisterDevice",
        () -> blocking().withDeadlineAfter(options.rpcTimeoutMs, TimeUnit.MILLISECONDS).registerDevice(request));
    if (deviceId.isEmpty()) {
      deviceId = response.getDeviceId();
    }
    return manifestOf(response.getManifestList());
  }

  public Task getTask() throws SyncException {
    GetTaskResponse r = call("GetTask",
        () -> blocking().withDeadlineAfter(options.rpcTimeoutMs, TimeUnit.MILLISECONDS)
            .getTask(GetTaskRequest.newBuilder().setDeviceId(deviceId).build()));
    Task task = new Task();
    task.action = r.getAction() == Action.ACTION_TRAIN ? "train" : r.getAction() == Action.ACTION_DONE ? "done" : "wait";
    task.roundId = r.getRoundId();
    task.roundState = r.getRoundState().name();
    task.deadlineUnixMs = r.getDeadlineUnixMs();
    task.generalistVersion = r.getGeneralistVersion();
    task.localConfig.put("local_steps", (long) r.getLocalConfig().getLocalSteps());
    task.localConfig.put("router_every", (long) r.getLocalConfig().getRouterEvery());
    task.localConfig.put("router_steps", (long) r.getLocalConfig().getRouterSteps());
    task.localConfig.put("expert_lr", r.getLocalConfig().getExpertLr());
    task.localConfig.put("router_lr", r.getLocalConfig().getRouterLr());
    task.localConfig.put("batch_size", (long) r.getLocalConfig().getBatchSize());
    task.localConfig.put("extra", new LinkedHashMap<String, Object>(r.getLocalConfig().getExtraMap()));
    task.manifest = manifestOf(r.getManifestList());
    for (dev.comigs.sync.v1.Encoding e : r.getAcceptedEncodingsList()) {
      Encoding enc = Encoding.fromProtoNumber(e.getNumber());
      if (enc != null) {
        task.acceptedEncodings.add(enc);
      }
    }
    task.maxUploadBytes = r.getMaxUploadBytes();
    task.retryAfterMs = r.getRetryAfterMs();
    task.alreadyUploaded = r.getAlreadyUploaded();
    task.message = r.getMessage();
    task.minDevices = r.getMinDevices();
    task.uploadsReceived = r.getUploadsReceived();
    return task;
  }

  /** Download a generalist version (the latest if negative), resuming after transient errors, verified. */
  public Generalist downloadGeneralist(long version) throws SyncException {
    ByteArrayOutputStream received = new ByteArrayOutputStream();
    long[] info = {-1, -1}; // version, total
    byte[][] sha = {null};
    call("DownloadGeneralist", () -> {
      DownloadGeneralistRequest.Builder request = DownloadGeneralistRequest.newBuilder().setOffset(received.size());
      long pinned = info[0] >= 0 ? info[0] : version;
      if (pinned >= 0) {
        request.setVersion(pinned);
      }
      java.util.Iterator<DownloadGeneralistResponse> stream =
          blocking().withDeadlineAfter(options.transferTimeoutMs, TimeUnit.MILLISECONDS).downloadGeneralist(request.build());
      while (stream.hasNext()) {
        DownloadGeneralistResponse message = stream.next();
        if (message.hasInfo()) {
          byte[] digest = message.getInfo().getPayloadSha256().toByteArray();
          if (info[0] >= 0 && (info[0] != message.getInfo().getVersion() || !Arrays.equals(sha[0], digest))) {
            throw new SyncException("DownloadGeneralist", Status.Code.DATA_LOSS,
                "the coordinator changed the generalist during a resumed download", 1);
          }
          info[0] = message.getInfo().getVersion();
          info[1] = message.getInfo().getTotalBytes();
          sha[0] = digest;
        } else {
          Chunk chunk = message.getChunk();
          if (chunk.getOffset() != received.size()) {
            throw new SyncException("DownloadGeneralist", Status.Code.DATA_LOSS,
                "download chunk at offset " + chunk.getOffset() + ", expected " + received.size(), 1);
          }
          chunk.getData().writeTo(received);
        }
      }
      return null;
    });
    byte[] payload = received.toByteArray();
    if (info[0] < 0 || payload.length != info[1]) {
      throw new SyncException("DownloadGeneralist", Status.Code.DATA_LOSS,
          "received " + payload.length + " of " + info[1] + " bytes", 1);
    }
    byte[] digest = AtomicFiles.sha256().digest(payload);
    if (!Arrays.equals(digest, sha[0])) {
      throw new SyncException("DownloadGeneralist", Status.Code.DATA_LOSS, "generalist checksum mismatch", 1);
    }
    return new Generalist(info[0], payload, AtomicFiles.hex(digest));
  }

  /** Upload an encoded payload under an idempotency key (the caller persisted the key first). */
  public UploadResult uploadEncoded(long roundId, long baseVersion, byte[] payload, long numSamples,
      Encoding encoding, String idempotencyKey) throws SyncException {
    UploadHeader header = UploadHeader.newBuilder()
        .setDeviceId(deviceId)
        .setRoundId(roundId)
        .setBaseVersion(baseVersion)
        .setNumSamples(numSamples)
        .setEncodingValue(encoding.protoNumber)
        .setIdempotencyKey(idempotencyKey)
        .setTotalBytes(payload.length)
        .setPayloadSha256(ByteString.copyFrom(AtomicFiles.sha256().digest(payload)))
        .build();
    UploadDeltaResponse response = call("UploadDelta", () -> {
      waitForSlot(roundId);
      return uploadOnce(header, payload);
    });
    // Nothing to send until the round publishes: close the connection (the channel reconnects on the
    // next call). The coordinator holds ~130-200 KiB of TLS state per connection that carried a delta.
    hangUp();
    UploadResult result = new UploadResult();
    result.roundId = response.getRoundId();
    result.uploadId = response.getUploadId();
    result.duplicate = response.getDuplicate();
    result.acceptedBytes = response.getAcceptedBytes();
    result.roundUploads = response.getRoundUploads();
    result.updateNorm = response.getUpdateNorm();
    result.clipped = response.getClipped();
    return result;
  }

  /**
   * Queue for one of the coordinator's upload slots and return once granted. The coordinator streams a
   * bounded number of uploads at once and says when to ask again, so a phone waits without holding a
   * stream (or, for long waits, a connection). Every attempt queues again: a grant is short-lived.
   */
  private void waitForSlot(long roundId) throws SyncException, InterruptedException {
    if (!useSlots) {
      return;
    }
    AcquireUploadSlotRequest request =
        AcquireUploadSlotRequest.newBuilder().setDeviceId(deviceId).setRoundId(roundId).build();
    long deadline = System.nanoTime() + TimeUnit.MILLISECONDS.toNanos(options.transferTimeoutMs);
    while (true) {
      AcquireUploadSlotResponse grant;
      try {
        grant = blocking().withDeadlineAfter(options.rpcTimeoutMs, TimeUnit.MILLISECONDS).acquireUploadSlot(request);
      } catch (StatusRuntimeException ex) {
        if (ex.getStatus().getCode() == Status.Code.UNIMPLEMENTED) {
          useSlots = false;
          return;
        }
        throw ex;
      }
      if (grant.getGranted()) {
        return;
      }
      long wait = (long) (grant.getRetryAfterMs() * (1.0 + 0.1 * random.nextDouble())); // de-synchronise
      if (System.nanoTime() + TimeUnit.MILLISECONDS.toNanos(wait) > deadline) {
        throw new SyncException("AcquireUploadSlot", Status.Code.DEADLINE_EXCEEDED,
            "no upload slot within " + options.transferTimeoutMs + " ms (" + grant.getQueuePosition()
                + " devices ahead, " + grant.getSlots() + " slots); try again later", 1);
      }
      idle(wait); // queued: hung up while we sleep, if the wait is long enough
    }
  }

  private UploadDeltaResponse uploadOnce(UploadHeader header, byte[] payload) throws Exception {
    CompletableFuture<UploadDeltaResponse> done = new CompletableFuture<>();
    int chunkBytes = options.chunkBytes;
    ClientResponseObserver<UploadDeltaRequest, UploadDeltaResponse> observer =
        new ClientResponseObserver<>() {
          UploadDeltaResponse response;

          @Override
          public void beforeStart(ClientCallStreamObserver<UploadDeltaRequest> requests) {
            long[] state = {-1, 0}; // next seq (-1: header), next offset
            requests.setOnReadyHandler(() -> {
              while (requests.isReady() && state[1] <= payload.length) {
                if (state[0] < 0) {
                  requests.onNext(UploadDeltaRequest.newBuilder().setHeader(header).build());
                  state[0] = 0;
                  if (payload.length == 0) {
                    state[1] = payload.length + 1;
                    requests.onCompleted();
                  }
                  continue;
                }
                int offset = (int) state[1];
                int length = Math.min(chunkBytes, payload.length - offset);
                requests.onNext(UploadDeltaRequest.newBuilder().setChunk(Chunk.newBuilder()
                    .setSeq(state[0]).setOffset(offset).setData(ByteString.copyFrom(payload, offset, length))).build());
                state[0]++;
                state[1] = offset + length;
                if (state[1] == payload.length) {
                  state[1] = payload.length + 1;
                  requests.onCompleted();
                }
              }
            });
          }

          @Override
          public void onNext(UploadDeltaResponse value) {
            response = value;
          }

          @Override
          public void onError(Throwable t) {
            done.completeExceptionally(t);
          }

          @Override
          public void onCompleted() {
            done.complete(response);
          }
        };
    async().withDeadlineAfter(options.transferTimeoutMs, TimeUnit.MILLISECONDS).uploadDelta(observer);
    return done.get();
  }

  public void reportMetrics(long roundId, Double trainLoss, Double validLoss, Double perplexity,
      Double stepTimeS, Long peakMemoryBytes, Integer localSteps) throws SyncException {
    ReportMetricsRequest.Builder request = ReportMetricsRequest.newBuilder().setDeviceId(deviceId).setRoundId(roundId);
    if (trainLoss != null) {
      request.setTrainLoss(trainLoss);
    }
    if (validLoss != null) {
      request.setValidLoss(validLoss);
    }
    if (perplexity != null) {
      request.setPerplexity(perplexity);
    }
    if (stepTimeS != null) {
      request.setStepTimeS(stepTimeS);
    }
    if (peakMemoryBytes != null) {
      request.setPeakMemoryBytes(peakMemoryBytes);
    }
    if (localSteps != null) {
      request.setLocalSteps(localSteps);
    }
    call("ReportMetrics", () -> blocking().withDeadlineAfter(options.rpcTimeoutMs, TimeUnit.MILLISECONDS)
        .reportMetrics(request.build()));
  }
}
