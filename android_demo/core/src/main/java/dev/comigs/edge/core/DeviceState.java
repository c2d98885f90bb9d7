package dev.comigs.edge.core;

import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.NoSuchFileException;
import java.nio.file.Path;
import java.nio.file.StandardCopyOption;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.TreeMap;
import java.util.UUID;

/**
 * What survives the app being killed, in one JSON file written atomically (temp + fsync + rename + fsync
 * of the directory) after every change.
 *
 * <p>{@code uploads} has the Python SyncClient's schema ({round: {base_version, key, acknowledged,
 * upload_id}}) plus what a device needs to re-send exactly the same bytes after a restart: the encoded
 * payload file (written durably before the key), its sha256, encoding and sample count. A corrupt file is
 * never overwritten: loading it throws, and {@link #moveAside} keeps its bytes under another name.
 */
public final class DeviceState {
  public static final String FORMAT = "comigs-android-device-state/1";
  private static final int KEEP_ROUNDS = 16;

  /** One round's upload, persisted before the first byte is sent. */
  public static final class Upload {
    public long roundId;
    public long baseVersion;
    public String key;
    public boolean acknowledged;
    public String uploadId = "";
    public boolean duplicate;
    public String encoding;
    public long numSamples;
    public String payloadFile;
    public String payloadSha256;
    /** "pending", "acknowledged" or "abandoned" (the round closed before the coordinator took it). */
    public String status = "pending";
    public String reason = "";
  }

  private final Path path;
  private final TreeMap<Long, Upload> uploads = new TreeMap<>();
  private String deviceId = "";
  private long generalistVersion = -1;
  private String generalistSha256 = "";
  private String generalistFile = "";
  private long roundsCompleted;
  private final Map<String, Object> lastMetrics = new TreeMap<>();

  private DeviceState(Path path) {
    this.path = path;
  }

  public Path path() {
    return path;
  }

  public Path directory() {
    return path.toAbsolutePath().getParent();
  }

  /** Load the state file (a fresh state if it does not exist); a corrupt file raises and stays as it is. */
  public static DeviceState load(Path path) throws ComigsException {
    DeviceState state = new DeviceState(path);
    byte[] bytes;
    try {
      bytes = Files.readAllBytes(path);
    } catch (NoSuchFileException ex) {
      return state;
    } catch (IOException ex) {
      throw corrupt(path, "cannot read it: " + ex.getMessage());
    }
    try {
      Map<String, Object> data = Json.asObject(Json.parse(new String(bytes, StandardCharsets.UTF_8)), "state");
      if (!FORMAT.equals(data.get("format"))) {
        throw new IllegalArgumentException("format is " + data.get("format") + ", expected " + FORMAT);
      }
      state.deviceId = Json.asString(data.getOrDefault("device_id", ""), "device_id");
      state.roundsCompleted = Json.asLong(data.getOrDefault("rounds_completed", 0L), "rounds_completed");
      Object generalist = data.get("generalist");
      if (generalist != null) {
        Map<String, Object> g = Json.asObject(generalist, "generalist");
        state.generalistVersion = Json.asLong(g.get("version"), "generalist.version");
        state.generalistSha256 = Json.asString(g.get("sha256"), "generalist.sha256");
        state.generalistFile = Json.asString(g.get("file"), "generalist.file");
      }
      Object metrics = data.get("last_metrics");
      if (metrics != null) {
        state.lastMetrics.putAll(Json.asObject(metrics, "last_metrics"));
      }
      for (Map.Entry<String, Object> item : Json.asObject(data.get("uploads"), "uploads").entrySet()) {
        Map<String, Object> u = Json.asObject(item.getValue(), "uploads." + item.getKey());
        Upload upload = new Upload();
        upload.roundId = Long.parseLong(item.getKey());
        upload.baseVersion = Json.asLong(u.get("base_version"), "base_version");
        upload.key = Json.asString(u.get("key"), "key");
        upload.acknowledged = (Boolean) u.get("acknowledged");
        upload.uploadId = Json.asString(u.getOrDefault("upload_id", ""), "upload_id");
        upload.duplicate = Boolean.TRUE.equals(u.get("duplicate"));
        upload.encoding = Json.asString(u.getOrDefault("encoding", "fp32"), "encoding");
        upload.numSamples = Json.asLong(u.getOrDefault("num_samples", 0L), "num_samples");
        upload.payloadFile = (String) u.get("payload_file");
        upload.payloadSha256 = (String) u.get("payload_sha256");
        upload.status = Json.asString(u.getOrDefault("status", upload.acknowledged ? "acknowledged" : "pending"), "status");
        upload.reason = Json.asString(u.getOrDefault("reason", ""), "reason");
        state.uploads.put(upload.roundId, upload);
      }
    } catch (Json.ParseException | IllegalArgumentException | ClassCastException | NullPointerException ex) {
      throw corrupt(path, ex.getMessage());
    }
    return state;
  }

  private static ComigsException corrupt(Path path, String why) {
    return new ComigsException(
        ComigsException.Kind.STATE_CORRUPT,
        "device state file " + path + " is corrupt (" + why + "). It was left untouched. "
            + "Restore it from a backup, or start fresh with --reset-state (the file is kept as "
            + path.getFileName() + ".corrupt-<time>; the coordinator keeps every upload it acknowledged).");
  }

  /** Rename a (corrupt) state file out of the way, keeping its bytes; returns the new name or null. */
  public static Path moveAside(Path path) throws IOException {
    if (!Files.exists(path)) {
      return null;
    }
    Path aside = path.resolveSibling(path.getFileName() + ".corrupt-" + System.currentTimeMillis());
    Files.move(path, aside, StandardCopyOption.ATOMIC_MOVE);
    AtomicFiles.fsyncDirectory(path.toAbsolutePath().getParent());
    return aside;
  }

  public synchronized void save() throws IOException {
    while (uploads.size() > KEEP_ROUNDS) {
      Upload oldest = uploads.firstEntry().getValue();
      if (!oldest.acknowledged && "pending".equals(oldest.status)) {
        break; // never forget an unacknowledged upload
      }
      uploads.pollFirstEntry();
    }
    Map<String, Object> data = new LinkedHashMap<>();
    data.put("format", FORMAT);
    data.put("device_id", deviceId);
    data.put("rounds_completed", roundsCompleted);
    if (generalistVersion >= 0) {
      Map<String, Object> g = new LinkedHashMap<>();
      g.put("version", generalistVersion);
      g.put("sha256", generalistSha256);
      g.put("file", generalistFile);
      data.put("generalist", g);
    }
    data.put("last_metrics", new TreeMap<>(lastMetrics));
    Map<String, Object> ups = new LinkedHashMap<>();
    for (Upload u : uploads.values()) {
      Map<String, Object> m = new LinkedHashMap<>();
      m.put("base_version", u.baseVersion);
      m.put("key", u.key);
      m.put("acknowledged", u.acknowledged);
      m.put("upload_id", u.uploadId);
      m.put("duplicate", u.duplicate);
      m.put("encoding", u.encoding);
      m.put("num_samples", u.numSamples);
      m.put("payload_file", u.payloadFile);
      m.put("payload_sha256", u.payloadSha256);
      m.put("status", u.status);
      m.put("reason", u.reason);
      ups.put(Long.toString(u.roundId), m);
    }
    data.put("uploads", ups);
    AtomicFiles.write(path, (Json.write(data) + "\n").getBytes(StandardCharsets.UTF_8));
  }

  // ------------------------------------------------------------------------------------ accessors

  public synchronized String deviceId() {
    return deviceId;
  }

  public synchronized void setDeviceId(String id) {
    deviceId = id;
  }

  public synchronized Upload upload(long roundId) {
    return uploads.get(roundId);
  }

  /** Uploads persisted but never acknowledged, oldest first: re-send these before anything else. */
  public synchronized List<Upload> pendingUploads() {
    List<Upload> out = new ArrayList<>();
    for (Upload u : uploads.values()) {
      if (!u.acknowledged && "pending".equals(u.status)) {
        out.add(u);
      }
    }
    return out;
  }

  /** The idempotency key of a round, created once (Python client format: device-rROUND-uuid). */
  public static String newKey(String deviceId, long roundId) {
    String key = (deviceId.isEmpty() ? "device" : deviceId) + "-r" + roundId + "-"
        + UUID.randomUUID().toString().replace("-", "");
    return key.length() > 128 ? key.substring(key.length() - 128) : key;
  }

  public synchronized void putUpload(Upload upload) {
    uploads.put(upload.roundId, upload);
  }

  public synchronized long generalistVersion() {
    return generalistVersion;
  }

  public synchronized String generalistSha256() {
    return generalistSha256;
  }

  public synchronized String generalistFile() {
    return generalistFile;
  }

  public synchronized void setGeneralist(long version, String sha256, String file) {
    generalistVersion = version;
    generalistSha256 = sha256;
    generalistFile = file;
  }

  public synchronized long roundsCompleted() {
    return roundsCompleted;
  }

  public synchronized void incrementRoundsCompleted() {
    roundsCompleted++;
  }

  public synchronized Map<String, Object> lastMetrics() {
    return new TreeMap<>(lastMetrics);
  }

  public synchronized void setLastMetrics(Map<String, Object> metrics) {
    lastMetrics.clear();
    lastMetrics.putAll(metrics);
  }
}
