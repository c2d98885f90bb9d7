package dev.comigs.edge.core;

import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.LinkedHashSet;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.TreeMap;

/**
 * manifest.json of an exported artifact directory (edge_runtime/artifacts/manifest.py, format_version 2):
 * which files make up each artifact and every file's sha256 and size. Nothing is handed to ExecuTorch
 * before {@link #verify} passed, so a truncated download or a tampered file is refused with a clear error.
 */
public final class ArtifactManifest {
  public static final String MANIFEST_FILE = "manifest.json";
  public static final String FORMAT_NAME = "comigs-export";
  public static final long FORMAT_VERSION = 2;
  private static final String[] REQUIRED_KEYS = {
    "format", "format_version", "export_id", "generation", "base_model", "comigs", "parameters", "artifacts", "files"
  };

  private final Path directory;
  private final Map<String, Object> data;

  private ArtifactManifest(Path directory, Map<String, Object> data) {
    this.directory = directory;
    this.data = data;
  }

  private static ComigsException manifestError(String message) {
    return new ComigsException(ComigsException.Kind.ARTIFACT_INTEGRITY, message);
  }

  public static ArtifactManifest load(Path directory) throws ComigsException {
    Path path = directory.resolve(MANIFEST_FILE);
    if (!Files.isRegularFile(path)) {
      throw manifestError(path + " not found: " + directory + " is not a comigs export directory "
          + "(create one with `comigs export --out DIR` and push it to the device).");
    }
    Map<String, Object> data;
    try {
      data = Json.asObject(Json.parse(new String(Files.readAllBytes(path), StandardCharsets.UTF_8)), "manifest");
    } catch (IOException | Json.ParseException | IllegalArgumentException ex) {
      throw manifestError(path + " is not valid JSON (" + ex.getMessage() + "); the export is corrupt: re-export or restore the directory.");
    }
    if (!FORMAT_NAME.equals(data.get("format"))) {
      throw manifestError(path + " is not a comigs export manifest (format must be '" + FORMAT_NAME + "').");
    }
    Object version = data.get("format_version");
    if (!(version instanceof Long) || (Long) version != FORMAT_VERSION) {
      throw manifestError(path + " has format_version " + version + ", but this app reads version "
          + FORMAT_VERSION + ": re-export the artifacts with the matching `comigs export` (or update the app).");
    }
    for (String key : REQUIRED_KEYS) {
      if (!data.containsKey(key)) {
        throw manifestError(path + " lacks '" + key + "'; the manifest is incomplete.");
      }
    }
    try {
      Map<String, Object> files = Json.asObject(data.get("files"), "files");
      for (Map.Entry<String, Object> file : files.entrySet()) {
        checkFileName(file.getKey());
        Map<String, Object> entry = Json.asObject(file.getValue(), "files." + file.getKey());
        Json.asString(entry.get("sha256"), "sha256");
        Json.asLong(entry.get("bytes"), "bytes");
      }
      for (Map.Entry<String, Object> art : Json.asObject(data.get("artifacts"), "artifacts").entrySet()) {
        Map<String, Object> artifact = Json.asObject(art.getValue(), "artifact " + art.getKey());
        Object roles = artifact.get("files");
        if (roles == null) {
          continue;
        }
        for (Map.Entry<String, Object> role : Json.asObject(roles, "files").entrySet()) {
          String file = checkFileName(role.getValue());
          if (!files.containsKey(file)) {
            throw manifestError("artifact '" + art.getKey() + "' uses '" + file + "' (" + role.getKey()
                + ") but the manifest records no hash for it; the manifest is inconsistent.");
          }
        }
      }
      Json.asList(data.get("parameters"), "parameters");
    } catch (IllegalArgumentException ex) {
      throw manifestError(path + ": " + ex.getMessage());
    }
    return new ArtifactManifest(directory, data);
  }

  private static String checkFileName(Object name) throws ComigsException {
    if (!(name instanceof String)) {
      throw manifestError("manifest names an invalid file " + name);
    }
    String s = (String) name;
    if (s.isEmpty() || s.contains("/") || s.contains("\\") || s.equals(".") || s.equals("..") || s.startsWith(".")) {
      throw manifestError("manifest names an invalid file '" + s + "': artifact files must be plain file "
          + "names inside the artifact directory.");
    }
    return s;
  }

  public Path directory() {
    return directory;
  }

  public long exportId() {
    return Json.asLong(data.get("export_id"), "export_id");
  }

  public long generation() {
    return Json.asLong(data.get("generation"), "generation");
  }

  public List<String> artifactNames() {
    return new ArrayList<>(new TreeMap<>(Json.asObject(data.get("artifacts"), "artifacts")).keySet());
  }

  public Map<String, Object> artifact(String name) throws ComigsException {
    Object artifact = Json.asObject(data.get("artifacts"), "artifacts").get(name);
    if (artifact == null) {
      throw manifestError(directory + " has no '" + name + "' artifact (it has: " + String.join(", ", artifactNames())
          + "); export it with `comigs export --formats " + name + " ...`.");
    }
    return Json.asObject(artifact, "artifact");
  }

  /** Absolute path of one file of an artifact (role: "program", "data", ...). */
  public Path path(String artifact, String role) throws ComigsException {
    Map<String, Object> files = Json.asObject(artifact(artifact).get("files"), "files");
    Object file = files.get(role);
    if (file == null) {
      throw manifestError("artifact '" + artifact + "' has no '" + role + "' file in the manifest.");
    }
    return directory.resolve((String) file);
  }

  /** Names, shapes and roles of every model parameter, as exported. */
  public Map<String, Map<String, Object>> parameters() {
    Map<String, Map<String, Object>> out = new TreeMap<>(Json.CODE_POINT_ORDER);
    for (Object p : Json.asList(data.get("parameters"), "parameters")) {
      Map<String, Object> param = Json.asObject(p, "parameter");
      out.put(Json.asString(param.get("name"), "parameter name"), param);
    }
    return out;
  }

  /** sha256 and size of every file of the given artifacts (all when empty) against the manifest. */
  public void verify(List<String> artifacts) throws ComigsException {
    List<String> names = artifacts == null || artifacts.isEmpty() ? artifactNames() : artifacts;
    Set<String> files = new LinkedHashSet<>();
    for (String name : names) {
      Object roles = artifact(name).get("files");
      if (roles != null) {
        for (Object file : Json.asObject(roles, "files").values()) {
          files.add((String) file);
        }
      }
    }
    for (String file : files) {
      verifyFile(file);
    }
  }

  public void verifyFile(String file) throws ComigsException {
    Map<String, Object> entry = Json.asObject(Json.asObject(data.get("files"), "files").get(file), "file entry");
    Path path = directory.resolve(file);
    if (!Files.isRegularFile(path)) {
      throw manifestError(path + " is listed in the manifest but missing: the export is incomplete; re-push "
          + "or restore the directory.");
    }
    try {
      long size = Files.size(path);
      long expected = Json.asLong(entry.get("bytes"), "bytes");
      if (size != expected) {
        throw manifestError(path + " has " + size + " bytes, the manifest says " + expected
            + ": the file is truncated or was replaced; re-push or restore it.");
      }
      String actual = AtomicFiles.sha256Hex(path);
      String want = Json.asString(entry.get("sha256"), "sha256");
      if (!actual.equals(want)) {
        throw manifestError(path + ": sha256 " + actual.substring(0, 16) + "... does not match the manifest ("
            + want.substring(0, Math.min(16, want.length())) + "...): the file is corrupted or was tampered with; "
            + "refusing to load it. Re-push or restore the directory.");
      }
    } catch (IOException ex) {
      throw manifestError("cannot read " + path + ": " + ex.getMessage());
    }
  }
}
