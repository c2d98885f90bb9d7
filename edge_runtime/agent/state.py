"""The agent's durable state directory: survives SIGKILL and power loss at any instant.

A device may lose power in the middle of a step, of a write or of an upload. What it must never
lose is what it had already completed (training steps, an acknowledged upload), and what it must
never do is send a delta twice or resume from a torn file. So:

- every blob (trainable tensors, optimizer state, the downloaded base generalist, the encoded
  delta waiting to be uploaded) is written to a *new* file named after the commit's generation,
  atomically (temp file, fsync, rename, fsync of the directory);
- `agent.json`, the manifest, is written last, atomically; it names every file of the commit with
  its sha256 and carries the small bookkeeping record (round, phase, counters, history). Replacing
  it *is* the commit: before the rename a reader sees the previous generation complete, after it
  the new one;
- only after the manifest is durable are the previous generation's files deleted. Files of a
  generation that never got its manifest (a crash mid-commit) are uncommitted leftovers and are
  removed when the directory is opened again.

Reading verifies every hash. Anything that does not verify raises `StateCorruptError`, whose
message says how to recover; nothing is ever deleted or overwritten to "repair" it, because the
specialists and routers in it exist nowhere else.

One agent per directory: an exclusive `flock` on `agent.lock` (released by the kernel on SIGKILL).
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edge_runtime.storage import atomic_write_bytes

STATE_FILE = "agent.json"
LOCK_FILE = "agent.lock"
SYNC_CLIENT_FILE = "sync-client.json"
SENT_DIR = "sent"
FORMAT = "comigs-agent-state"
FORMAT_VERSION = 1
_BLOB = re.compile(r"^(?P<key>[a-z][a-z0-9_]*)\.g(?P<gen>\d{6,})\.bin$")


class StateError(Exception):
    """The state directory cannot be used as it is; the message says why and what to do."""


class StateCorruptError(StateError):
    """A committed file is missing, unreadable or does not match its recorded hash."""


class StateMismatchError(StateError):
    """The directory belongs to a device set up differently (other experts, model or backend)."""


class StateLockedError(StateError):
    """Another agent process is using the directory."""


def recovery_hint(root: Path) -> str:
    return (f"Nothing was deleted. To recover, restore {root} from a backup, or move it aside "
            f"(mv {root} {root}.corrupt) and start again with an empty --state-dir: the device then rejoins "
            "from the coordinator's current generalist but starts its specialists, routers and optimizer "
            "state afresh.")


class StateDir:
    """Generation-numbered blobs plus a manifest written last (see the module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        self._lock_fd: int | None = None
        self._manifest: dict[str, Any] | None = None

    # -- locking -------------------------------------------------------------------------------
    def lock(self) -> None:
        """Take the directory for this process (non-blocking) and drop uncommitted leftovers."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateLockedError(f"{self.root} is in use by another `comigs edge run` process; each device "
                                   "agent needs its own --state-dir.") from None
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> StateDir:
        self.lock()
        return self

    def __exit__(self, *exc: object) -> None:
        self.unlock()

    # -- reading -------------------------------------------------------------------------------
    @property
    def generation(self) -> int:
        return int(self._manifest["generation"]) if self._manifest else 0

    def load(self) -> dict[str, Any] | None:
        """The committed record, or None for a fresh directory; verifies every committed file."""
        path = self.root / STATE_FILE
        if not path.exists():
            self._manifest = None
            self._remove_uncommitted()
            return None
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self._corrupt(f"{path} is unreadable ({exc})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise self._corrupt(f"{path} is not a comigs agent state manifest")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise StateMismatchError(f"{path} has state format version {manifest.get('format_version')!r}; this "
                                     f"comigs-edge reads version {FORMAT_VERSION}. Use the matching comigs-edge "
                                     "version or another --state-dir.")
        for key in ("generation", "files", "record"):
            if key not in manifest:
                raise self._corrupt(f"{path} lacks {key!r}")
        self._manifest = manifest
        for key in manifest["files"]:
            self.read_blob(key)  # verifies presence and hash now, not half-way through a round
        self._remove_uncommitted()
        return copy.deepcopy(manifest["record"])

    def has_blob(self, key: str) -> bool:
        return bool(self._manifest) and key in self._manifest["files"]

    def read_blob(self, key: str) -> bytes:
        if not self._manifest or key not in self._manifest["files"]:
            raise self._corrupt(f"{STATE_FILE} records no {key!r} file")
        entry = self._manifest["files"][key]
        path = self.root / entry["file"]
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise self._corrupt(f"{path.name}, listed in {STATE_FILE}, cannot be read ({exc.strerror})") from None
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise self._corrupt(f"{path.name} does not match the sha256 recorded in {STATE_FILE}")
        return data

    # -- writing -------------------------------------------------------------------------------
    def commit(self, record: Mapping[str, Any], blobs: Mapping[str, bytes | None] | None = None) -> None:
        """Durably replace the state: `blobs` (None removes a key) plus the record; other keys stay."""
        generation = self.generation + 1
        files = dict(self._manifest["files"]) if self._manifest else {}
        for key, data in (blobs or {}).items():
            if data is None:
                files.pop(key, None)
                continue
            if not re.fullmatch(r"[a-z][a-z0-9_]*", key):
                raise ValueError(f"invalid blob key {key!r}")
            name = f"{key}.g{generation:06d}.bin"
            atomic_write_bytes(self.root / name, data)
            files[key] = {"file": name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "generation": generation,
                    "files": files, "record": record}
        atomic_write_bytes(self.root / STATE_FILE, json.dumps(manifest, indent=1, sort_keys=True).encode())
        self._manifest = json.loads(json.dumps(manifest))
        self._remove_uncommitted()

    def write_sent_copy(self, round_id: int, payload: bytes, keep: int) -> Path | None:
        """Keep the exact bytes uploaded for a round (what left the device, for audits); the last `keep`."""
        if keep <= 0:
            return None
        directory = self.root / SENT_DIR
        path = directory / f"round-{round_id:06d}.safetensors"
        atomic_write_bytes(path, payload)
        for old in sorted(directory.glob("round-*.safetensors"))[:-keep]:
            old.unlink(missing_ok=True)
        return path

    # -- helpers -------------------------------------------------------------------------------
    def _remove_uncommitted(self) -> None:
        """Delete blob files the manifest does not name: older generations or a commit that never finished."""
        keep = {entry["file"] for entry in self._manifest["files"].values()} if self._manifest else set()
        for path in self.root.iterdir():
            if _BLOB.match(path.name) and path.name not in keep:
                path.unlink(missing_ok=True)
            elif path.name.startswith(f".{STATE_FILE}.") or (path.name.startswith(".") and path.name.endswith(".tmp")
                                                            and _BLOB.match(path.name[1:].rsplit(".", 2)[0])):
                path.unlink(missing_ok=True)  # a temp file of an interrupted atomic write

    def _corrupt(self, reason: str) -> StateCorruptError:
        return StateCorruptError(f"the agent state in {self.root} is corrupt: {reason}. {recovery_hint(self.root)}")
