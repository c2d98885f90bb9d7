"""Bad input gives one clear error, a documented exit code, and loses nothing of the device's state."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.agent.loop import (
    EXIT_AUTH,
    EXIT_STATE,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    DeviceAgent,
    run_agent,
)
from edge_runtime.cli import main
from sync_service.store import Store

from .edge_helpers import (
    agent_options,
    agent_state,
    free_port,
    initial_generalist,
    inprocess_coordinator,
    make_device_data,
)


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tls, model_dir: Path) -> Iterator[dict]:
    """A live coordinator (5 rounds) and a device state directory that completed round 1."""
    root = tmp_path_factory.mktemp("edge-errors")
    coordinator = inprocess_coordinator(root, initial_generalist(model_dir), ["dev"], tls, rounds=5)
    data = make_device_data(root / "data", seed=9)
    options = agent_options(coordinator.target, coordinator.tokens["dev"], data, root / "state", tls,
                            model=str(model_dir), max_rounds=1)
    assert DeviceAgent(options).run() == 0
    yield {"coordinator": coordinator, "data": data, "state": root / "state", "model": str(model_dir)}
    coordinator.close()


def _copy_state(trained: dict, tmp_path: Path) -> Path:
    target = tmp_path / "state"
    shutil.copytree(trained["state"], target)
    return target


def _run(trained: dict, state: Path, tls, **kwargs) -> int:
    coordinator = trained["coordinator"]
    kwargs.setdefault("max_rounds", 2)
    options = agent_options(kwargs.pop("target", coordinator.target), kwargs.pop("token", coordinator.tokens["dev"]),
                            kwargs.pop("data", trained["data"]), state, tls, model=trained["model"], **kwargs)
    return run_agent(options)


def test_unreachable_coordinator_retries_then_says_so(trained, tmp_path, tls, capsys) -> None:
    state = _copy_state(trained, tmp_path)
    before = _snapshot(state)
    code = _run(trained, state, tls, target=f"127.0.0.1:{free_port()}", retries=3)
    err = capsys.readouterr().err
    assert code == EXIT_UNREACHABLE
    assert "cannot reach the coordinator" in err and "after 3 attempt(s)" in err and "run the same command" in err
    assert _snapshot(state) == before


def test_revoked_token_is_refused_clearly(tmp_path, tls, model_dir, capsys) -> None:
    coordinator = inprocess_coordinator(tmp_path, initial_generalist(model_dir), ["dev"], tls, rounds=5)
    data = make_device_data(tmp_path / "data", seed=4)
    try:
        options = agent_options(coordinator.target, coordinator.tokens["dev"], data, tmp_path / "state", tls,
                                model=str(model_dir), max_rounds=1)
        assert run_agent(options) == 0
        store = Store(coordinator.state_dir)
        store.revoke_device("dev")
        store.close()
        before = _snapshot(tmp_path / "state")
        again = agent_options(coordinator.target, coordinator.tokens["dev"], data, tmp_path / "state", tls,
                              model=str(model_dir), max_rounds=2)
        code = run_agent(again)
    finally:
        coordinator.close()
    err = capsys.readouterr().err
    assert code == EXIT_AUTH
    assert "revoked" in err and "add-device NAME --rotate" in err
    assert _snapshot(tmp_path / "state") == before


@pytest.mark.parametrize("damage", ["blob", "manifest", "missing", "sync-client"])
def test_corrupt_state_dir_is_reported_with_a_recovery_path(damage, trained, tmp_path, tls, capsys) -> None:
    state = _copy_state(trained, tmp_path)
    if damage == "blob":
        target = next(state.glob("tensors.g*.bin"))
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "manifest":
        (state / "agent.json").write_bytes((state / "agent.json").read_bytes()[:40])
    elif damage == "missing":
        next(state.glob("trainer.g*.bin")).unlink()
    else:
        (state / "sync-client.json").write_text("{not json")
    before = _snapshot(state)
    code = _run(trained, state, tls)
    err = capsys.readouterr().err
    assert code == EXIT_STATE
    assert "corrupt" in err and "Nothing was deleted" in err and f"mv {state} {state}.corrupt" in err
    assert _snapshot(state) == before  # the agent repaired nothing and removed nothing


def test_state_of_another_device_setup_is_refused(trained, tmp_path, tls, capsys) -> None:
    state = _copy_state(trained, tmp_path)
    before = _snapshot(state)
    assert _run(trained, state, tls, experts="1,2") == EXIT_STATE
    assert "belongs to a device set up as" in capsys.readouterr().err
    assert _snapshot(state) == before


def test_state_dir_is_intact_after_the_errors(trained) -> None:
    record, tensors = agent_state(trained["state"])
    assert record["completed_rounds"] == 1 and tensors


@pytest.mark.parametrize("case", ["empty", "too-short", "no-npy", "missing-dir"])
def test_data_dir_without_usable_text(case, trained, tmp_path, tls, capsys) -> None:
    data = tmp_path / "data"
    data.mkdir()
    if case == "empty":
        np.save(data / "train.npy", np.zeros(0, dtype=np.int64))
        np.save(data / "valid.npy", np.zeros(0, dtype=np.int64))
    elif case == "too-short":
        np.save(data / "train.npy", np.arange(10, dtype=np.int64))
        np.save(data / "valid.npy", np.arange(10, dtype=np.int64))
    elif case == "no-npy":
        (data / "notes.txt").write_text("plain text is not token splits")
    else:
        data = tmp_path / "nowhere"
    code = _run(trained, tmp_path / "fresh-state", tls, data=data)
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert ("no usable text" in err or "does not exist" in err) and "comigs data prepare" in err
    assert not (tmp_path / "fresh-state" / "agent.json").exists()


def test_artifact_hash_mismatch_is_refused(trained, tmp_path, tls, et_artifacts, capsys) -> None:
    artifacts = tmp_path / "artifacts"
    shutil.copytree(et_artifacts, artifacts)
    program = artifacts / "training.pte"
    data = bytearray(program.read_bytes())
    data[-100] ^= 0xFF
    program.write_bytes(bytes(data))
    code = _run(trained, tmp_path / "et-state", tls, backend="executorch", artifacts=artifacts)
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert "cannot use the artifacts" in err and "sha256" in err
    assert not (tmp_path / "et-state" / "agent.json").exists()


def test_plan_prints_the_choice_and_refuses_an_impossible_budget(trained, et_artifacts, capsys) -> None:
    common = ["edge", "plan", "--data", str(trained["data"]), "--model", trained["model"], "--rank", "4",
              "--seq-len", "16", "--batch-size", "4"]
    assert main([*common, "--budget-mb", "100000"]) == 0
    out = capsys.readouterr().out
    assert "micro-batch 4" in out and "estimated peak" in out
    assert main([*common, "--budget-mb", "50"]) == EXIT_USAGE
    assert "--budget-mb" in capsys.readouterr().err
    assert main(["edge", "plan", "--data", str(trained["data"]), "--backend", "executorch", "--artifacts",
                 str(et_artifacts), "--batch-size", "4", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["micro_batch_size"] == 2 and plan["batch_size"] == 4 and plan["arena_bytes"] > 0


def test_run_help_documents_the_exit_codes(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["edge", "run", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--budget-mb" in out and "exit codes" in out and "--state-dir" in out
