"""Eager PyTorch and the exported ExecuTorch training program behind one interface give the same training."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_runtime import roles
from edge_runtime.agent.backends import EagerBackend, ExecuTorchBackend
from edge_runtime.agent.loop import DeviceAgent, build_device_model
from edge_runtime.data.tokens import TokenSplit
from edge_runtime.training.trainer import TrainerConfig
from sync_service import encoding as wire

from .conftest import EXPORT_BATCH
from .edge_helpers import (
    AGENT_SEED,
    RANK,
    SEQ_LEN,
    agent_options,
    agent_state,
    initial_generalist,
    inprocess_coordinator,
    make_device_data,
)
from tests.builders import synthetic_language

TOL = 1e-4


def test_backends_take_the_same_steps(model_dir: Path, et_artifacts: Path) -> None:
    """Bi-level steps with gradient accumulation (2 program calls per step) and two router phases:
    every step's loss and the final trainable tensors agree within 1e-4."""
    train, valid = TokenSplit(synthetic_language(2000, seed=1)), TokenSplit(synthetic_language(600, seed=2))
    config = TrainerConfig(batch_size=2 * EXPORT_BATCH, micro_batch_size=EXPORT_BATCH, seq_len=SEQ_LEN,
                           router_every=2, router_steps=2, total_steps=8, seed=3)
    eager = EagerBackend(build_device_model(str(model_dir), "1,1", RANK, AGENT_SEED), config, train, valid)
    et = ExecuTorchBackend(et_artifacts, config, train, valid)
    try:
        start = eager.trainable_state()
        et_start = et.trainable_state()
        assert set(start) == set(et_start)
        for name in start:
            assert float((start[name] - et_start[name]).abs().max()) == 0.0, name
        for _ in range(5):
            a, b = eager.run_step(), et.run_step()
            assert [m.phase for m in a] == [m.phase for m in b]
            for ma, mb in zip(a, b, strict=True):
                assert abs(ma.loss - mb.loss) <= TOL, (ma, mb)
        assert eager.step == et.step == 5
        end, et_end = eager.trainable_state(), et.trainable_state()
        for name in end:
            assert float((end[name] - et_end[name]).abs().max()) <= TOL, name
        moved = [n for n in end if float((end[n] - start[n]).abs().max()) > 1e-3]
        assert {roles.role_of(n) for n in moved} == {roles.Role.GENERALIST, roles.Role.SPECIALIST, roles.Role.ROUTER}
        assert abs(eager.validation_loss(valid, 2) - et.validation_loss(valid, 2)) <= 0.05  # ET adds the LB term
    finally:
        et.close()


def _agent_round(backend: str, root: Path, tls, model_dir: Path, et_artifacts: Path) -> tuple:
    coordinator = inprocess_coordinator(root, initial_generalist(model_dir), ["dev"], tls, rounds=1,
                                        local_steps=4, batch_size=EXPORT_BATCH)
    data = make_device_data(root / "data", seed=5)
    try:
        options = agent_options(coordinator.target, coordinator.tokens["dev"], data, root / "state", tls,
                                backend=backend, model=str(model_dir), artifacts=et_artifacts, max_rounds=1)
        assert DeviceAgent(options).run() == 0
    finally:
        coordinator.close()
    record, tensors = agent_state(root / "state")
    assert record["completed_rounds"] == 1 and record["history"][-1]["steps_done"] == 4
    payload = (root / "state" / "sent" / "round-000001.safetensors").read_bytes()
    return record["history"][-1]["train_loss"], wire.decode(payload), {n: t.numpy() for n, t in tensors.items()}


def test_both_backends_run_a_round_through_the_agent_alike(tmp_path: Path, tls, model_dir: Path,
                                                           et_artifacts: Path) -> None:
    """The same device (same init, data, seed) on each backend, one real round against a coordinator:
    mean training loss, uploaded delta and final state agree within 1e-4."""
    loss_a, delta_a, state_a = _agent_round("eager", tmp_path / "eager", tls, model_dir, et_artifacts)
    loss_b, delta_b, state_b = _agent_round("executorch", tmp_path / "et", tls, model_dir, et_artifacts)
    assert abs(loss_a - loss_b) <= TOL
    assert set(delta_a) == set(delta_b) and all(roles.role_of(n) is roles.Role.GENERALIST for n in delta_a)
    for name in delta_a:
        assert np.abs(delta_a[name]).max() > 1e-4, f"{name}: the round did not train the generalist"
        assert np.abs(delta_a[name] - delta_b[name]).max() <= TOL, name
    for name in state_a:
        assert np.abs(state_a[name] - state_b[name]).max() <= TOL, name
