package dev.comigs.edge.harness;

import dev.comigs.edge.core.ArtifactManifest;
import dev.comigs.edge.core.ComigsException;
import dev.comigs.edge.core.DeviceState;
import dev.comigs.edge.core.Encoding;
import dev.comigs.edge.core.Json;
import dev.comigs.edge.core.RoundLoop;
import dev.comigs.edge.core.SyncClient;
import dev.comigs.edge.core.Tensor;
import dev.comigs.edge.core.TensorPayload;
import dev.comigs.sync.v1.DeviceCapabilities;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/**
 * Command line of the JVM conformance harness: the Android app's `core` logic driven without Android.
 *
 * <pre>
 *   run       the round loop against a coordinator, with the DeterministicTrainer
 *   upload    upload one delta file (an fp32 payload) in a given encoding, as one or more devices
 *   encode    encode an fp32 payload in another encoding, offline (byte-for-byte checks)
 *   decode    decode any payload and write it back as a canonical fp32 payload
 *   verify-artifacts   check an export directory's manifest and sha256s
 * </pre>
 *
 * Events are JSON lines on stdout; an error is one line "error: KIND: message" on stderr plus an
 * {"event":"error"} line, and the exit code says its kind (see ComigsException.Kind).
 */
public final class ConformanceDevice {
  private ConformanceDevice() {}

  private static Map<String, List<String>> parse(String[] args, int from) {
    Map<String, List<String>> out = new HashMap<>();
    for (int i = from; i < args.length; i++) {
      String a = args[i];
      if (!a.startsWith("--")) {
        throw new IllegalArgumentException("unexpected argument " + a);
      }
      String key = a.substring(2);
      String value = "true";
      if (i + 1 < args.length && !args[i + 1].startsWith("--")) {
        value = args[++i];
      }
      out.computeIfAbsent(key, k -> new ArrayList<>()).add(value);
    }
    return out;
  }

  private static String opt(Map<String, List<String>> o, String key, String fallback) {
    List<String> v = o.get(key);
    return v == null ? fallback : v.get(v.size() - 1);
  }

  private static String req(Map<String, List<String>> o, String key) {
    String v = opt(o, key, null);
    if (v == null) {
      throw new IllegalArgumentException("--" + key + " is required");
    }
    return v;
  }

  static synchronized void emit(Map<String, Object> event) {
    System.out.println(Json.write(event));
    System.out.flush();
  }

  public static void main(String[] args) {
    int code;
    try {
      if (args.length == 0) {
        throw new IllegalArgumentException("usage: ConformanceDevice run|upload|encode|decode|verify-artifacts [--options]");
      }
      Map<String, List<String>> o = parse(args, 1);
      switch (args[0]) {
        case "run":
          run(o);
          break;
        case "upload":
          upload(o);
          break;
        case "encode":
          encode(o);
          break;
        case "decode":
          decode(o);
          break;
        case "verify-artifacts":
          verifyArtifacts(o);
          break;
        default:
          throw new IllegalArgumentException("unknown command " + args[0]);
      }
      code = 0;
    } catch (ComigsException ex) {
      fail(ex.kind().name(), ex.getMessage());
      code = ex.kind().exitCode;
    } catch (IllegalArgumentException ex) {
      fail("USAGE", ex.getMessage());
      code = 2;
    } catch (Exception ex) {
      fail("INTERNAL", ex.toString());
      ex.printStackTrace();
      code = 1;
    }
    System.out.flush();
    System.exit(code);
  }

  private static void fail(String kind, String message) {
    Map<String, Object> e = new LinkedHashMap<>();
    e.put("event", "error");
    e.put("kind", kind);
    e.put("message", message);
    emit(e);
    System.err.println("error: " + kind + ": " + message);
  }

  private static SyncClient.Options clientOptions(Map<String, List<String>> o, String device, String tokenFile)
      throws Exception {
    SyncClient.Options options = new SyncClient.Options();
    options.target = req(o, "target");
    options.token = new String(Files.readAllBytes(Paths.get(tokenFile)), StandardCharsets.US_ASCII).trim();
    options.deviceId = device;
    String ca = opt(o, "ca", null);
    if (ca != null) {
      options.caPem = Files.readAllBytes(Paths.get(ca));
    }
    options.insecure = o.containsKey("insecure");
    options.serverName = opt(o, "server-name", null);
    options.maxAttempts = Integer.parseInt(opt(o, "max-attempts", "6"));
    options.initialBackoffMs = Long.parseLong(opt(o, "initial-backoff-ms", "200"));
    options.maxBackoffMs = Long.parseLong(opt(o, "max-backoff-ms", "2000"));
    options.rpcTimeoutMs = Long.parseLong(opt(o, "rpc-timeout-ms", "10000"));
    options.transferTimeoutMs = Long.parseLong(opt(o, "transfer-timeout-ms", "60000"));
    return options;
  }

  private static void run(Map<String, List<String>> o) throws Exception {
    Path statePath = Paths.get(req(o, "state"));
    if (o.containsKey("reset-state")) {
      try {
        DeviceState.load(statePath);
      } catch (ComigsException ex) {
        Path aside = DeviceState.moveAside(statePath);
        Map<String, Object> e = new LinkedHashMap<>();
        e.put("event", "state_moved_aside");
        e.put("file", String.valueOf(aside));
        emit(e);
      }
    }
    DeviceState state = DeviceState.load(statePath); // before any network: a corrupt file fails here
    RoundLoop.Options loop = new RoundLoop.Options();
    List<Encoding> schedule = new ArrayList<>();
    for (String name : opt(o, "encoding", "fp32").split(",")) {
      schedule.add(Encoding.fromName(name.trim()));
    }
    loop.encodingSchedule = schedule;
    loop.maxRounds = Integer.parseInt(opt(o, "rounds", "0"));
    loop.maxPollMs = Long.parseLong(opt(o, "max-poll-ms", "200"));
    loop.idleTimeoutMs = Long.parseLong(opt(o, "idle-timeout-ms", "0"));
    String artifacts = opt(o, "artifacts", null);
    if (artifacts != null) {
      loop.artifactDir = Paths.get(artifacts);
      loop.artifacts = o.getOrDefault("artifact", List.of());
    }
    loop.capabilities = DeviceCapabilities.newBuilder().setNumExperts(2).setNumGeneralists(1).setLoraRank(8)
        .setRuntime("jvm-conformance").setRuntimeVersion(System.getProperty("java.version"))
        .setPlatform(System.getProperty("os.name") + "-" + System.getProperty("os.arch")).build();
    String pauseAt = opt(o, "pause-at", null);
    long pauseMs = Long.parseLong(opt(o, "pause-ms", "60000"));
    RoundLoop.Hooks hooks = (point, round) -> {
      if (point.equals(pauseAt)) {
        Map<String, Object> e = new LinkedHashMap<>();
        e.put("event", "paused");
        e.put("point", point);
        e.put("round", round);
        emit(e);
        try {
          Thread.sleep(pauseMs);
        } catch (InterruptedException ex) {
          Thread.currentThread().interrupt();
        }
      }
    };
    DeterministicTrainer trainer = new DeterministicTrainer(
        Long.parseLong(opt(o, "seed", "0")), Long.parseLong(opt(o, "samples", "100")));
    try (SyncClient client = new SyncClient(clientOptions(o, req(o, "device"), req(o, "token-file")))) {
      int rounds = new RoundLoop(client, state, trainer, loop, ConformanceDevice::emit, hooks).run();
      Map<String, Object> e = new LinkedHashMap<>();
      e.put("event", "finished");
      e.put("rounds_uploaded", (long) rounds);
      e.put("rounds_completed", state.roundsCompleted());
      emit(e);
    }
  }

  /** --job DEVICE:TOKEN_FILE:ENCODING (repeatable): upload the same delta as each device. */
  private static void upload(Map<String, List<String>> o) throws Exception {
    Map<String, Tensor> delta = TensorPayload.decode(Files.readAllBytes(Paths.get(req(o, "delta"))));
    long round = Long.parseLong(req(o, "round"));
    long base = Long.parseLong(req(o, "base"));
    long samples = Long.parseLong(opt(o, "samples", "100"));
    for (String job : o.getOrDefault("job", List.of())) {
      String[] parts = job.split(":", 3);
      Encoding encoding = Encoding.fromName(parts[2]);
      byte[] payload = TensorPayload.encode(delta, encoding);
      try (SyncClient client = new SyncClient(clientOptions(o, parts[0], parts[1]))) {
        String key = DeviceState.newKey(parts[0], round);
        SyncClient.UploadResult result = client.uploadEncoded(round, base, payload, samples, encoding, key);
        Map<String, Object> e = new LinkedHashMap<>();
        e.put("event", "uploaded");
        e.put("device", parts[0]);
        e.put("encoding", encoding.wireName);
        e.put("upload_id", result.uploadId);
        e.put("bytes", (long) payload.length);
        e.put("duplicate", result.duplicate);
        emit(e);
      }
    }
  }

  private static void encode(Map<String, List<String>> o) throws Exception {
    Map<String, Tensor> tensors = TensorPayload.decode(Files.readAllBytes(Paths.get(req(o, "delta"))));
    Encoding encoding = Encoding.fromName(req(o, "encoding"));
    TensorPayload.Int8Granularity granularity =
        TensorPayload.Int8Granularity.valueOf(opt(o, "granularity", "auto").toUpperCase(java.util.Locale.ROOT));
    Files.write(Paths.get(req(o, "out")), TensorPayload.encode(tensors, encoding, granularity, null));
  }

  private static void decode(Map<String, List<String>> o) throws Exception {
    Map<String, Tensor> tensors = TensorPayload.decode(Files.readAllBytes(Paths.get(req(o, "payload"))));
    Files.write(Paths.get(req(o, "out")), TensorPayload.encode(tensors, Encoding.FP32));
  }

  private static void verifyArtifacts(Map<String, List<String>> o) throws Exception {
    ArtifactManifest manifest = ArtifactManifest.load(Paths.get(req(o, "dir")));
    manifest.verify(o.getOrDefault("artifact", List.of()));
    Map<String, Object> e = new LinkedHashMap<>();
    e.put("event", "artifacts_verified");
    e.put("export_id", manifest.exportId());
    e.put("artifacts", new ArrayList<Object>(manifest.artifactNames()));
    emit(e);
  }
}
