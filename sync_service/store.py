"""The coordinator's durable state: one SQLite database (WAL) plus tensor files, in one directory.

    STATE_DIR/sync.db                                  devices, generalist versions, rounds, uploads, reports
    STATE_DIR/generalists/v000003.safetensors          every published generalist (canonical fp32 payload)
    STATE_DIR/uploads/round-000004/<device>-<id>.safetensors   acknowledged uploads of unfinished rounds
    STATE_DIR/tmp/                                     in-flight uploads; emptied at start-up

Ordering rules that make crashes harmless: a tensor file is fsynced and renamed into place *before* the
database row that refers to it is committed (synchronous=FULL), and nothing is acknowledged before that
commit. So a row always has its file; a file without a row (crash between rename and commit) is an
orphan that `recover()` deletes, and the device's retry, with the same idempotency key, redoes it.

One connection, guarded by a lock, serves all server threads (SQLite serialises writers anyway); the
CLI (`add-device`, `status`) opens its own connection and relies on WAL + busy_timeout to coexist with a
running server.
"""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime import roles
from sync_service import encoding
from sync_service.durable import fsync_dir, make_dirs_durable, write_atomic
from sync_service.manifest import Manifest

log = logging.getLogger("sync_service.store")

SCHEMA_VERSION = 1
DB_NAME = "sync.db"
ROUND_STATES = ("open", "collecting", "aggregating", "published", "failed")
ACTIVE_ROUND_STATES = ("open", "collecting", "aggregating")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    token_id TEXT NOT NULL UNIQUE,
    token_salt BLOB NOT NULL,
    token_hash BLOB NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL,
    capabilities TEXT,
    registered_at REAL
);
CREATE TABLE IF NOT EXISTS generalists (
    version INTEGER PRIMARY KEY,
    round_id INTEGER,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    round_id INTEGER PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('open', 'collecting', 'aggregating', 'published', 'failed')),
    base_version INTEGER NOT NULL,
    opened_at REAL NOT NULL,
    deadline REAL NOT NULL,
    extensions INTEGER NOT NULL DEFAULT 0,
    closed_at REAL,
    published_version INTEGER,
    reason TEXT,
    config TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS uploads (
    upload_id TEXT PRIMARY KEY,
    round_id INTEGER NOT NULL REFERENCES rounds(round_id),
    device_id TEXT NOT NULL REFERENCES devices(device_id),
    idempotency_key TEXT NOT NULL,
    base_version INTEGER NOT NULL,
    num_samples INTEGER NOT NULL,
    encoding TEXT NOT NULL,
    payload_sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    path TEXT NOT NULL,
    update_norm REAL NOT NULL,
    clip_scale REAL NOT NULL,
    received_at REAL NOT NULL,
    UNIQUE (round_id, device_id),
    UNIQUE (device_id, idempotency_key)
);
CREATE TABLE IF NOT EXISTS round_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    round_id INTEGER NOT NULL,
    at REAL NOT NULL,
    event TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS reports (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    round_id INTEGER NOT NULL,
    at REAL NOT NULL,
    metrics TEXT NOT NULL
);
"""


class StoreError(RuntimeError):
    """The state directory is missing, not initialised, or from an incompatible version."""


@dataclass(frozen=True)
class DeviceRow:
    device_id: str
    token_id: str
    token_salt: bytes
    token_hash: bytes
    created_at: float
    revoked_at: float | None
    capabilities: dict[str, Any] | None
    registered_at: float | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


@dataclass(frozen=True)
class GeneralistRow:
    version: int
    round_id: int | None
    path: str
    sha256: str
    size: int
    created_at: float


@dataclass(frozen=True)
class RoundRow:
    round_id: int
    state: str
    base_version: int
    opened_at: float
    deadline: float
    extensions: int
    closed_at: float | None
    published_version: int | None
    reason: str | None
    config: dict[str, Any]

    @property
    def accepting(self) -> bool:
        return self.state in ("open", "collecting")


@dataclass(frozen=True)
class UploadRow:
    upload_id: str
    round_id: int
    device_id: str
    idempotency_key: str
    base_version: int
    num_samples: int
    encoding: str
    payload_sha256: str
    size: int
    path: str
    update_norm: float
    clip_scale: float
    received_at: float


def _device(row: sqlite3.Row) -> DeviceRow:
    caps = json.loads(row["capabilities"]) if row["capabilities"] else None
    return DeviceRow(
        row["device_id"],
        row["token_id"],
        bytes(row["token_salt"]),
        bytes(row["token_hash"]),
        row["created_at"],
        row["revoked_at"],
        caps,
        row["registered_at"],
    )


def _round(row: sqlite3.Row) -> RoundRow:
    return RoundRow(
        row["round_id"],
        row["state"],
        row["base_version"],
        row["opened_at"],
        row["deadline"],
        row["extensions"],
        row["closed_at"],
        row["published_version"],
        row["reason"],
        json.loads(row["config"]),
    )


def _upload(row: sqlite3.Row) -> UploadRow:
    return UploadRow(**{key: row[key] for key in row.keys()})


class Store:
    """Access to one state directory. Thread-safe; every write is one committed transaction."""

    def __init__(self, state_dir: str | Path) -> None:
        self.root = Path(state_dir).resolve()
        if not (self.root / DB_NAME).exists():
            raise StoreError(
                f"{self.root} is not an initialised sync state directory "
                f"(run `comigs sync init --state-dir {state_dir} --generalist FILE.safetensors`)"
            )
        self._lock = threading.RLock()
        self._db = _connect(self.root / DB_NAME)
        version = self.get_meta("schema_version")
        if version != str(SCHEMA_VERSION):
            raise StoreError(
                f"{self.root}: schema version {version}, this coordinator needs {SCHEMA_VERSION}"
            )
        self.manifest = Manifest.from_json(self.get_meta("manifest") or "[]")

    # ------------------------------------------------------------------ creation and layout

    @classmethod
    def initialise(cls, state_dir: str | Path, generalist: str | Path | Mapping[str, np.ndarray]) -> Store:
        """Create a state directory whose generalist version 0 is `generalist` (a file or arrays).

        All devices start from this exact generalist, which is why the coordinator owns it. Tensors of
        any float dtype are stored as float32 in the canonical payload layout.
        """
        root = Path(state_dir).resolve()
        if (root / DB_NAME).exists():
            raise StoreError(f"{root} is already initialised; use another directory or delete it first")
        for suffix in ("", "-wal", "-shm"):  # leftovers of an initialisation that crashed
            (root / (DB_NAME + ".init" + suffix)).unlink(missing_ok=True)
        source: Mapping[str, np.ndarray]
        opened: encoding.TensorFile | None = None
        if isinstance(generalist, (str, Path)):
            try:
                opened = encoding.TensorFile(generalist)
            except (OSError, encoding.PayloadError) as exc:
                raise StoreError(f"cannot read initial generalist {generalist}: {exc}") from None
            source = opened
        else:
            source = generalist
        try:
            # A coordinator set up with a specialist or router tensor would ask every device for it.
            roles.check_shared(source)
            manifest = Manifest.from_arrays(
                {name: np.empty(np.shape(source[name]), np.float32) for name in source}
            )
            make_dirs_durable(root)
            for sub in ("generalists", "uploads", "tmp"):
                (root / sub).mkdir(exist_ok=True)
            fsync_dir(root)
            relative = "generalists/v000000.safetensors"
            checked = _FiniteChecked(source)
            sha, size = write_atomic(
                root / relative,
                encoding.encode_iter(checked, "fp32", metadata={"version": "0"}),
                root / "tmp",
            )
            db = _connect(root / (DB_NAME + ".init"))
            with db:
                db.executescript(_SCHEMA)
                db.executemany(
                    "INSERT INTO meta (key, value) VALUES (?, ?)",
                    [
                        ("schema_version", str(SCHEMA_VERSION)),
                        ("manifest", manifest.to_json()),
                        ("created_at", repr(time.time())),
                    ],
                )
                db.execute(
                    "INSERT INTO generalists (version, round_id, path, sha256, size, created_at) "
                    "VALUES (0, NULL, ?, ?, ?, ?)",
                    (relative, sha, size, time.time()),
                )
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            db.close()
        finally:
            if opened is not None:
                opened.close()
        # The database appears under its real name only once complete: a crash mid-init leaves no
        # half-initialised state directory behind.
        for suffix in ("-wal", "-shm"):
            (root / (DB_NAME + ".init" + suffix)).unlink(missing_ok=True)
        (root / (DB_NAME + ".init")).rename(root / DB_NAME)
        fsync_dir(root)
        log.info(
            "state initialised",
            extra={
                "fields": {"state_dir": str(root), "tensors": len(manifest), "delta_bytes": manifest.nbytes}
            },
        )
        return cls(root)

    @staticmethod
    def is_initialised(state_dir: str | Path) -> bool:
        return (Path(state_dir) / DB_NAME).exists()

    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    def round_upload_dir(self, round_id: int) -> Path:
        return self.root / "uploads" / f"round-{round_id:06d}"

    def generalist_relpath(self, version: int) -> str:
        return f"generalists/v{version:06d}.safetensors"

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT under the store lock (rolled back on any exception)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def get_meta(self, key: str) -> str | None:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0]["value"] if rows else None

    # ------------------------------------------------------------------ devices

    def add_device(
        self, device_id: str, token_id: str, salt: bytes, token_hash: bytes, *, rotate: bool
    ) -> None:
        now = time.time()
        with self.transaction() as db:
            exists = db.execute("SELECT 1 FROM devices WHERE device_id = ?", (device_id,)).fetchone()
            if exists and not rotate:
                raise StoreError(f"device {device_id!r} already exists (use --rotate to issue a new token)")
            if exists:
                db.execute(
                    "UPDATE devices SET token_id = ?, token_salt = ?, token_hash = ?, revoked_at = NULL "
                    "WHERE device_id = ?",
                    (token_id, salt, token_hash, device_id),
                )
            else:
                db.execute(
                    "INSERT INTO devices (device_id, token_id, token_salt, token_hash, created_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (device_id, token_id, salt, token_hash, now),
                )

    def revoke_device(self, device_id: str) -> bool:
        """Revoke a device's token; False if it was already revoked. Raises StoreError if unknown."""
        with self.transaction() as db:
            row = db.execute("SELECT revoked_at FROM devices WHERE device_id = ?", (device_id,)).fetchone()
            if row is None:
                raise StoreError(f"no device named {device_id!r}")
            if row["revoked_at"] is not None:
                return False
            db.execute("UPDATE devices SET revoked_at = ? WHERE device_id = ?", (time.time(), device_id))
            return True

    def device_by_token_id(self, token_id: str) -> DeviceRow | None:
        rows = self._query("SELECT * FROM devices WHERE token_id = ?", (token_id,))
        return _device(rows[0]) if rows else None

    def get_device(self, device_id: str) -> DeviceRow | None:
        rows = self._query("SELECT * FROM devices WHERE device_id = ?", (device_id,))
        return _device(rows[0]) if rows else None

    def list_devices(self) -> list[DeviceRow]:
        return [_device(row) for row in self._query("SELECT * FROM devices ORDER BY device_id")]

    def count_active_devices(self) -> int:
        return int(self._query("SELECT COUNT(*) AS n FROM devices WHERE revoked_at IS NULL")[0]["n"])

    def set_capabilities(self, device_id: str, capabilities: dict[str, Any]) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE devices SET capabilities = ?, registered_at = ? WHERE device_id = ?",
                (json.dumps(capabilities, sort_keys=True), time.time(), device_id),
            )

    # ------------------------------------------------------------------ generalists

    def latest_generalist(self) -> GeneralistRow:
        rows = self._query("SELECT * FROM generalists ORDER BY version DESC LIMIT 1")
        return GeneralistRow(**dict(rows[0]))

    def get_generalist(self, version: int) -> GeneralistRow | None:
        rows = self._query("SELECT * FROM generalists WHERE version = ?", (version,))
        return GeneralistRow(**dict(rows[0])) if rows else None

    def list_generalists(self) -> list[GeneralistRow]:
        return [GeneralistRow(**dict(r)) for r in self._query("SELECT * FROM generalists ORDER BY version")]

    # ------------------------------------------------------------------ rounds

    def current_round(self) -> RoundRow | None:
        """The newest round that is not finished (open, collecting or aggregating), if any."""
        rows = self._query(
            "SELECT * FROM rounds WHERE state IN ('open', 'collecting', 'aggregating') "
            "ORDER BY round_id DESC LIMIT 1"
        )
        return _round(rows[0]) if rows else None

    def get_round(self, round_id: int) -> RoundRow | None:
        rows = self._query("SELECT * FROM rounds WHERE round_id = ?", (round_id,))
        return _round(rows[0]) if rows else None

    def last_round(self) -> RoundRow | None:
        rows = self._query("SELECT * FROM rounds ORDER BY round_id DESC LIMIT 1")
        return _round(rows[0]) if rows else None

    def list_rounds(self, limit: int | None = None) -> list[RoundRow]:
        sql = "SELECT * FROM rounds ORDER BY round_id DESC" + (" LIMIT ?" if limit else "")
        return [_round(row) for row in self._query(sql, (limit,) if limit else ())]

    def count_rounds(self, state: str) -> int:
        return int(self._query("SELECT COUNT(*) AS n FROM rounds WHERE state = ?", (state,))[0]["n"])

    def open_round(self, base_version: int, deadline: float, config: dict[str, Any], now: float) -> RoundRow:
        with self.transaction() as db:
            cursor = db.execute(
                "INSERT INTO rounds (state, base_version, opened_at, deadline, config) "
                "VALUES ('open', ?, ?, ?, ?)",
                (base_version, now, deadline, json.dumps(config, sort_keys=True)),
            )
            round_id = int(cursor.lastrowid or 0)
            _event(db, round_id, now, "opened", f"base version {base_version}, deadline {deadline:.3f}")
        opened = self.get_round(round_id)
        assert opened is not None
        return opened

    def update_round(self, round_id: int, event: str, detail: str, now: float, **fields: Any) -> None:
        """Change a round's columns and record why, in one transaction."""
        allowed = {"state", "deadline", "extensions", "closed_at", "published_version", "reason"}
        if not fields or set(fields) - allowed:
            raise ValueError(f"bad round fields {sorted(fields)}")
        assignments = ", ".join(f"{key} = ?" for key in fields)
        with self.transaction() as db:
            db.execute(f"UPDATE rounds SET {assignments} WHERE round_id = ?", (*fields.values(), round_id))
            _event(db, round_id, now, event, detail)

    def publish(self, round_id: int, version: int, relpath: str, sha256: str, size: int, now: float) -> None:
        """Record a published generalist and close its round, atomically."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO generalists (version, round_id, path, sha256, size, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (version, round_id, relpath, sha256, size, now),
            )
            db.execute(
                "UPDATE rounds SET state = 'published', published_version = ?, closed_at = ? "
                "WHERE round_id = ?",
                (version, now, round_id),
            )
            _event(db, round_id, now, "published", f"generalist version {version} (sha256 {sha256[:16]})")

    def round_events(self, round_id: int) -> list[tuple[float, str, str]]:
        rows = self._query(
            "SELECT at, event, detail FROM round_events WHERE round_id = ? ORDER BY id", (round_id,)
        )
        return [(row["at"], row["event"], row["detail"]) for row in rows]

    # ------------------------------------------------------------------ uploads

    def upload_by_key(self, device_id: str, key: str) -> UploadRow | None:
        rows = self._query(
            "SELECT * FROM uploads WHERE device_id = ? AND idempotency_key = ?", (device_id, key)
        )
        return _upload(rows[0]) if rows else None

    def upload_for(self, round_id: int, device_id: str) -> UploadRow | None:
        rows = self._query(
            "SELECT * FROM uploads WHERE round_id = ? AND device_id = ?", (round_id, device_id)
        )
        return _upload(rows[0]) if rows else None

    def uploads_for_round(self, round_id: int) -> list[UploadRow]:
        """A round's uploads sorted by device id: the canonical aggregation order."""
        rows = self._query("SELECT * FROM uploads WHERE round_id = ? ORDER BY device_id", (round_id,))
        return [_upload(row) for row in rows]

    def count_uploads(self, round_id: int) -> int:
        return int(self._query("SELECT COUNT(*) AS n FROM uploads WHERE round_id = ?", (round_id,))[0]["n"])

    def insert_upload(self, upload: UploadRow, *, first_upload: bool) -> None:
        """Commit an acknowledged upload (its file must already be durable at `upload.path`)."""
        self.insert_uploads([upload], first_upload=first_upload)

    def insert_uploads(self, uploads: Sequence[UploadRow], *, first_upload: bool) -> None:
        """Commit several uploads of one round in one transaction (one WAL fsync: group commit).

        `first_upload`: the round is still "open" and the first of `uploads` moves it to "collecting".
        """
        if not uploads:
            return
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO uploads (upload_id, round_id, device_id, idempotency_key, base_version, "
                "num_samples, "
                "encoding, payload_sha256, size, path, update_norm, clip_scale, received_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        upload.upload_id,
                        upload.round_id,
                        upload.device_id,
                        upload.idempotency_key,
                        upload.base_version,
                        upload.num_samples,
                        upload.encoding,
                        upload.payload_sha256,
                        upload.size,
                        upload.path,
                        upload.update_norm,
                        upload.clip_scale,
                        upload.received_at,
                    )
                    for upload in uploads
                ],
            )
            if first_upload:
                first = uploads[0]
                db.execute(
                    "UPDATE rounds SET state = 'collecting' WHERE round_id = ? AND state = 'open'",
                    (first.round_id,),
                )
                _event(
                    db,
                    first.round_id,
                    first.received_at,
                    "collecting",
                    f"first upload from {first.device_id}",
                )

    # ------------------------------------------------------------------ reports

    def add_report(self, device_id: str, round_id: int, metrics: dict[str, Any]) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO reports (device_id, round_id, at, metrics) VALUES (?, ?, ?, ?)",
                (device_id, round_id, time.time(), json.dumps(metrics, sort_keys=True)),
            )

    def latest_reports(self) -> dict[str, tuple[int, float, dict[str, Any]]]:
        rows = self._query(
            "SELECT device_id, round_id, at, metrics FROM reports WHERE id IN "
            "(SELECT MAX(id) FROM reports GROUP BY device_id) ORDER BY device_id"
        )
        return {row["device_id"]: (row["round_id"], row["at"], json.loads(row["metrics"])) for row in rows}

    def count_reports(self) -> int:
        return int(self._query("SELECT COUNT(*) AS n FROM reports")[0]["n"])

    # ------------------------------------------------------------------ recovery

    def recover(self, *, keep_uploads: bool = False) -> dict[str, int]:
        """Start-up clean-up after a crash; returns counts of what it did (for the log).

        Deletes in-flight temp files, upload files that no committed row refers to, generalist files
        whose publication never committed, and (unless `keep_uploads`) the uploads of finished rounds.
        Reports acknowledged uploads whose file is missing: that would be a storage fault, not a crash.
        """
        counts = {
            "temp_files": 0,
            "orphan_uploads": 0,
            "orphan_generalists": 0,
            "finished_round_dirs": 0,
            "missing_upload_files": 0,
        }
        self.tmp_dir.mkdir(exist_ok=True)
        for path in self.tmp_dir.iterdir():
            if path.is_file():
                path.unlink()
                counts["temp_files"] += 1
        known_generalists = {row.path for row in self.list_generalists()}
        for path in sorted((self.root / "generalists").glob("*")):
            if path.is_file() and str(path.relative_to(self.root)) not in known_generalists:
                path.unlink()
                counts["orphan_generalists"] += 1
        referenced = {row["path"] for row in self._query("SELECT path FROM uploads")}
        states = {row["round_id"]: row["state"] for row in self._query("SELECT round_id, state FROM rounds")}
        uploads_root = self.root / "uploads"
        uploads_root.mkdir(exist_ok=True)
        for round_dir in sorted(uploads_root.iterdir()):
            try:
                round_id = int(round_dir.name.split("-")[1])
            except (IndexError, ValueError):
                continue
            if states.get(round_id) in ("published", "failed") and not keep_uploads:
                shutil.rmtree(round_dir)
                counts["finished_round_dirs"] += 1
                continue
            for path in round_dir.iterdir():
                if str(path.relative_to(self.root)) not in referenced:
                    path.unlink()
                    counts["orphan_uploads"] += 1
        for row in self._query(
            "SELECT u.path FROM uploads u JOIN rounds r USING (round_id) "
            "WHERE r.state IN ('open', 'collecting', 'aggregating')"
        ):
            if not (self.root / row["path"]).exists():
                counts["missing_upload_files"] += 1
                log.error("acknowledged upload file is missing", extra={"fields": {"path": row["path"]}})
        return counts

    def drop_round_uploads(self, round_id: int) -> None:
        """Delete a finished round's upload files (their rows stay, as the audit trail)."""
        directory = self.round_upload_dir(round_id)
        if directory.exists():
            shutil.rmtree(directory)
            fsync_dir(directory.parent)


def _event(db: sqlite3.Connection, round_id: int, now: float, event: str, detail: str) -> None:
    db.execute(
        "INSERT INTO round_events (round_id, at, event, detail) VALUES (?, ?, ?, ?)",
        (round_id, now, event, detail),
    )


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode = WAL")
    # FULL: every commit fsyncs the WAL, so an acknowledged upload survives power loss, not only a crash.
    db.execute("PRAGMA synchronous = FULL")
    db.execute("PRAGMA foreign_keys = ON")
    db.execute("PRAGMA busy_timeout = 30000")
    return db


class _FiniteChecked(Mapping[str, np.ndarray]):
    """Wraps a tensor source so the initial generalist is refused if it holds NaN or Inf."""

    def __init__(self, source: Mapping[str, np.ndarray]) -> None:
        self._source = source

    def __getitem__(self, name: str) -> np.ndarray:
        value = np.asarray(self._source[name], dtype=np.float32)
        if not np.all(np.isfinite(value)):
            raise StoreError(f"initial generalist tensor {name!r} has non-finite values")
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._source)

    def __len__(self) -> int:
        return len(self._source)
