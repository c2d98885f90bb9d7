"""Tokens are stored hashed, checked per call, revocable and rotatable; the store is durable (WAL)."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import grpc
import numpy as np
import pytest
from safetensors.numpy import save_file

from sync_service.auth import Authenticator, add_device, hash_secret, parse_token, validate_device_id
from sync_service.errors import SyncError
from sync_service.store import Store, StoreError

from .sync_helpers import make_generalist


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = Store.initialise(tmp_path / "state", make_generalist(0))
    yield store
    store.close()


def _md(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def test_token_is_stored_only_as_a_salted_hash(store: Store) -> None:
    token = add_device(store, "pi-1")
    token_id, secret = parse_token(token)
    row = store.get_device("pi-1")
    raw = (store.root / "sync.db").read_bytes() + (store.root / "sync.db-wal").read_bytes()
    assert secret.encode() not in raw
    assert row.token_hash == hash_secret(row.token_salt, secret) and len(row.token_salt) == 16
    assert Authenticator(store).authenticate(_md(token)) == "pi-1"


def test_revoke_and_rotate(store: Store) -> None:
    auth = Authenticator(store)
    old = add_device(store, "pi-1")
    assert store.revoke_device("pi-1") and not store.revoke_device("pi-1")
    with pytest.raises(SyncError) as info:
        auth.authenticate(_md(old))
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
    new = add_device(store, "pi-1", rotate=True)
    assert auth.authenticate(_md(new)) == "pi-1"
    with pytest.raises(SyncError) as info:
        auth.authenticate(_md(old))  # the old token died with the rotation
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(StoreError, match="already exists"):
        add_device(store, "pi-1")
    with pytest.raises(StoreError, match="no device"):
        store.revoke_device("nobody")


@pytest.mark.parametrize("name", ["", "-x", "a/b", "x" * 65, "dev ice", "../etc"])
def test_device_names_are_restricted(name: str) -> None:
    with pytest.raises(ValueError, match="invalid device name"):
        validate_device_id(name)


def test_revocation_from_another_process_connection_takes_effect_immediately(store: Store) -> None:
    token = add_device(store, "pi-2")
    auth = Authenticator(store)
    assert auth.authenticate(_md(token)) == "pi-2"
    other = Store(store.root)  # what `comigs sync revoke-device` does, beside the running server
    other.revoke_device("pi-2")
    other.close()
    with pytest.raises(SyncError, match="revoked"):
        auth.authenticate(_md(token))


def test_database_is_wal_with_full_sync(store: Store) -> None:
    db = sqlite3.connect(store.root / "sync.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_initialise_from_a_safetensors_file_of_any_float_dtype(tmp_path: Path) -> None:
    a, b = "up.generalist_A", "up.generalist_B"
    tensors = {a: np.arange(4, dtype=np.float16).reshape(2, 2), b: np.ones(3, np.float64)}
    save_file(tensors, tmp_path / "init.safetensors")
    store = Store.initialise(tmp_path / "s", tmp_path / "init.safetensors")
    assert store.manifest.as_shapes() == {a: ((2, 2), "float32"), b: ((3,), "float32")}
    assert store.latest_generalist().version == 0
    store.close()
    with pytest.raises(StoreError, match="already initialised"):
        Store.initialise(tmp_path / "s", tmp_path / "init.safetensors")
    with pytest.raises(StoreError, match="not an initialised"):
        Store(tmp_path / "nothing")
    bad = {"x.generalist_A": np.array([np.nan], np.float32)}
    with pytest.raises(StoreError, match="non-finite"):
        Store.initialise(tmp_path / "bad", bad)
    assert not (tmp_path / "bad" / "sync.db").exists()


@pytest.mark.parametrize(
    ("name", "role"),
    [
        ("model.layers.0.mlp.experts.up_proj.specialist_A", "specialist"),
        ("model.layers.0.mlp.router.weight", "router"),
        ("model.layers.0.mlp.up_proj.weight", "frozen"),
    ],
)
def test_a_coordinator_is_never_set_up_to_collect_private_tensors(tmp_path: Path, name: str, role: str) -> None:
    """Specialists and routers never leave a device, so a generalist file holding one is refused."""
    tensors = {"model.layers.0.mlp.experts.up_proj.generalist_A": np.zeros((1, 2, 3), np.float32),
               name: np.zeros((2, 2), np.float32)}
    with pytest.raises(ValueError, match=rf"{re.escape(repr(name))} is a {role} tensor"):
        Store.initialise(tmp_path / "s", tensors)
    assert not (tmp_path / "s" / "sync.db").exists()


def test_recover_removes_temp_and_orphan_files(store: Store) -> None:
    (store.tmp_dir / "x.part").write_bytes(b"partial")
    orphan_dir = store.round_upload_dir(7)
    orphan_dir.mkdir(parents=True)
    (orphan_dir / "dev-abc.safetensors").write_bytes(b"orphan")
    (store.root / "generalists" / "v000009.safetensors").write_bytes(b"never committed")
    counts = store.recover()
    assert counts["temp_files"] == 1 and counts["orphan_uploads"] == 1 and counts["orphan_generalists"] == 1
    assert not any(store.tmp_dir.iterdir()) and not any(orphan_dir.iterdir())
    assert (store.root / "generalists" / "v000000.safetensors").exists()
