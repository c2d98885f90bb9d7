package dev.comigs.edge.core;

/**
 * Base of every error the device logic raises on purpose; {@link #kind()} says what went wrong in a
 * way a UI (or a command line's exit code) can act on.
 */
public class ComigsException extends Exception {
  public enum Kind {
    /** The coordinator could not be reached or kept failing transiently; retry later. */
    UNAVAILABLE(3),
    /** The token is unknown, wrong or revoked: re-enrol the device. */
    AUTH(4),
    /** The local state file cannot be read; it was left untouched. */
    STATE_CORRUPT(5),
    /** An artifact file is missing, truncated or tampered with; it was not loaded. */
    ARTIFACT_INTEGRITY(6),
    /** The coordinator refused the request (bad payload, late upload, ...). */
    REFUSED(7),
    /** Invalid local input (arguments, data, manifest). */
    INVALID(8);

    public final int exitCode;

    Kind(int exitCode) {
      this.exitCode = exitCode;
    }
  }

  private final Kind kind;

  public ComigsException(Kind kind, String message) {
    super(message);
    this.kind = kind;
  }

  public ComigsException(Kind kind, String message, Throwable cause) {
    super(message, cause);
    this.kind = kind;
  }

  public Kind kind() {
    return kind;
  }
}
