"""The operator commands, run the way an operator runs them (`python -m sync_service ...`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from edge_runtime.sync_client import SyncClient

from .sync_helpers import REPO_ROOT, ServerProcess, make_delta, make_generalist


def sync(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "sync_service", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_operator_workflow(tmp_path: Path, tls) -> None:  # type: ignore[no-untyped-def]
    state = str(tmp_path / "state")
    save_file(make_generalist(0), tmp_path / "init.safetensors")
    out = sync("init", "--state-dir", state, "--generalist", str(tmp_path / "init.safetensors")).stdout
    assert "12 tensors" in out and "generalist version 0" in out

    added = sync("add-device", "--state-dir", state, "pi-1")
    token = added.stdout.strip()
    assert token.startswith("cmgs1.") and "shown only once" in added.stderr
    duplicate = sync("add-device", "--state-dir", state, "pi-1", check=False)
    assert duplicate.returncode == 1 and "already exists" in duplicate.stderr
    bad = sync("add-device", "--state-dir", state, "bad/name", check=False)
    assert bad.returncode == 1 and "invalid device name" in bad.stderr
    token2 = sync("add-device", "--state-dir", state, "pi-2").stdout.strip()

    server = ServerProcess(Path(state), tls, extra_args=["--min-devices", "2", "--rounds", "1"])
    try:
        for tok in (token, token2):
            with SyncClient(f"127.0.0.1:{server.port}", tok, root_certificates=tls.cert_pem) as client:
                client.upload_delta(1, 0, make_delta(1), 8)
        status_text = sync("status", "--state-dir", state).stdout
        # A second coordinator on the same state directory must refuse to start.
        refused = sync(
            "serve",
            "--state-dir",
            state,
            "--listen",
            "127.0.0.1:0",
            "--insecure",
            "--metrics-listen",
            "",
            check=False,
        )
        assert refused.returncode == 1 and "already serving" in refused.stderr
        revoked = sync("revoke-device", "--state-dir", state, "pi-2").stdout
        assert "revoked" in revoked
    finally:
        assert server.terminate() == 0
    assert "pi-1" in status_text and "ROUND" in status_text
    status = json.loads(sync("status", "--state-dir", state, "--json").stdout)
    assert status["rounds"][0]["state"] == "published" and status["generalist"]["version"] == 1
    assert [d["revoked"] for d in status["devices"]] == [False, True]
    sync("export-generalist", "--state-dir", state, str(tmp_path / "out.safetensors"))
    exported = load_file(tmp_path / "out.safetensors")
    assert set(exported) == set(make_generalist(0)) and exported[next(iter(exported))].dtype == np.float32
    missing = sync("export-generalist", "--state-dir", state, "--version", "7", str(tmp_path / "v7"), check=False)
    assert missing.returncode == 1 and "version 7 does not exist" in missing.stderr
    unwritable = sync("export-generalist", "--state-dir", state, str(tmp_path / "no" / "dir" / "g"), check=False)
    assert unwritable.returncode == 1 and "cannot write" in unwritable.stderr, unwritable.stderr
    assert "Traceback" not in missing.stderr + unwritable.stderr


def test_insecure_is_refused_off_loopback_and_tls_needs_both_files(tmp_path: Path) -> None:
    state = str(tmp_path / "state")
    save_file(make_generalist(0), tmp_path / "init.safetensors")
    sync("init", "--state-dir", state, "--generalist", str(tmp_path / "init.safetensors"))
    refused = sync("serve", "--state-dir", state, "--listen", "0.0.0.0:0", "--insecure", check=False)
    assert refused.returncode == 1 and "refusing --insecure" in refused.stderr
    no_tls = sync("serve", "--state-dir", state, "--listen", "127.0.0.1:0", check=False)
    assert no_tls.returncode == 1 and "TLS needs both" in no_tls.stderr
    missing = sync(
        "serve",
        "--state-dir",
        str(tmp_path / "nowhere"),
        "--insecure",
        "--listen",
        "127.0.0.1:0",
        check=False,
    )
    assert missing.returncode == 1 and "not an initialised" in missing.stderr
    too_few = sync("serve", "--state-dir", state, "--insecure", "--listen", "127.0.0.1:0", "--max-connections", "12",
                   check=False)
    assert too_few.returncode == 1 and "must exceed the upload slots (12)" in too_few.stderr


def test_register_adds_the_sync_group_to_the_comigs_parser() -> None:
    import argparse

    from sync_service.cli import register

    parser = argparse.ArgumentParser(prog="comigs")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["sync", "add-device", "--state-dir", "/tmp/x", "pi-9", "--rotate"])
    assert args.name == "pi-9" and args.rotate and callable(args.func)
    args = parser.parse_args(["sync"])
    assert args.func(args) == 2  # the group alone prints its help


def test_every_command_has_help() -> None:
    for command in ("init", "serve", "add-device", "revoke-device", "status", "export-generalist"):
        text = sync(command, "--help").stdout
        assert "usage:" in text and len(text) > 200
