"""End to end: a real coordinator process and three agent processes on loopback, two rounds.

Every byte each agent sends goes through a recording TCP proxy (plaintext gRPC on loopback, so the
recording is readable): no specialist or router tensor name or value may occur in it, while the
generalist deltas do (the positive control that shows the recording sees the payloads).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import torch

from edge_runtime import roles
from sync_service import encoding as wire

from .edge_helpers import (
    RecordingProxy,
    agent_command,
    agent_state,
    initial_generalist,
    initial_private,
    make_device_data,
    start_agent,
    start_coordinator,
    value_windows,
)

DEVICES = {"dev-a": ("1,1", 3000), "dev-b": ("1,2", 4500), "dev-c": ("1,3", 6000)}
ROUNDS = 2


def test_three_devices_two_rounds(tmp_path: Path, model_dir: Path) -> None:
    generalist0 = initial_generalist(model_dir)
    coordinator = start_coordinator(tmp_path, generalist0, list(DEVICES), args=[
        "--min-devices", "3", "--rounds", str(ROUNDS), "--local-steps", "4", "--router-every", "2",
        "--router-steps", "1", "--batch-size", "4", "--round-timeout", "120"])
    proxies, agents = {}, {}
    try:
        for i, (name, (experts, n_train)) in enumerate(DEVICES.items()):
            data = make_device_data(tmp_path / f"data-{name}", seed=i + 1, n_train=n_train)
            proxies[name] = RecordingProxy(coordinator.port, tmp_path / f"sent-{name}.bin")
            command = agent_command(proxies[name].target, coordinator.tokens[name], data, tmp_path / f"state-{name}",
                                    model_dir, experts=experts)
            agents[name] = start_agent(command, tmp_path / f"agent-{name}.log")
        for name, process in agents.items():
            try:
                code = process.wait(120)
            except subprocess.TimeoutExpired:
                process.kill()
                code = "timeout"
            log = (tmp_path / f"agent-{name}.log").read_text()[-3000:]
            assert code == 0, f"{name}: {code}\n{log}\n{coordinator.log()}"
    finally:
        for process in agents.values():
            if process.poll() is None:
                process.kill()
        for proxy in proxies.values():
            proxy.close()
        coordinator.stop()

    states = {name: agent_state(tmp_path / f"state-{name}") for name in DEVICES}
    # -- the published generalists are the sample-weighted means of the devices' updated generalists --
    previous = generalist0
    for round_id in range(1, ROUNDS + 1):
        entries = {name: next(h for h in record["history"] if h["id"] == round_id)
                   for name, (record, _) in states.items()}
        assert {e["base_version"] for e in entries.values()} == {round_id - 1}
        deltas = {name: wire.decode((tmp_path / f"state-{name}" / "sent" / f"round-{round_id:06d}.safetensors")
                                    .read_bytes()) for name in DEVICES}
        weights = {name: entries[name]["num_samples"] for name in DEVICES}
        assert weights == {name: n for name, (_, n) in DEVICES.items()}
        published = coordinator.generalist(round_id)
        assert set(published) == set(previous)
        for tensor in published:
            updated = {name: previous[tensor] + deltas[name][tensor] for name in DEVICES}
            expected = sum(weights[n] * updated[n].astype(np.float64) for n in DEVICES) / sum(weights.values())
            np.testing.assert_allclose(published[tensor], expected, rtol=0, atol=1e-6, err_msg=tensor)
            assert np.abs(updated["dev-a"] - updated["dev-c"]).max() > 1e-5  # devices really differ
        previous = published
    # the last delta is exactly "updated minus downloaded": the device's generalist now minus v(ROUNDS-1)
    base = coordinator.generalist(ROUNDS - 1)
    for name, (_, tensors) in states.items():
        sent = wire.decode((tmp_path / f"state-{name}" / "sent" / f"round-{ROUNDS:06d}.safetensors").read_bytes())
        generalist = {n: t.numpy() for n, t in tensors.items() if roles.role_of(n) is roles.Role.GENERALIST}
        assert set(sent) == set(generalist)
        for tensor, value in generalist.items():
            np.testing.assert_array_equal(sent[tensor], value - base[tensor])

    # -- specialists and routers changed on every device and never left it ----------------------------
    for name, (experts, _) in DEVICES.items():
        record, tensors = states[name]
        assert record["completed_rounds"] == ROUNDS
        initial = initial_private(model_dir, experts)
        private = {n: t for n, t in tensors.items() if roles.role_of(n) in (roles.Role.SPECIALIST, roles.Role.ROUTER)}
        assert set(private) == set(initial) and private
        assert {roles.role_of(n) for n in private} == {roles.Role.SPECIALIST, roles.Role.ROUTER}
        for tensor in private:
            assert float((private[tensor] - initial[tensor]).abs().max()) > 1e-4, f"{name}: {tensor} never trained"
        sent = proxies[name].recorded()
        assert len(sent) > 2 * 10_000, "the recording missed the uploads"
        assert b"specialist" not in sent and b"router.weight" not in sent
        for tensor in private:
            assert tensor.encode() not in sent
            for values in (initial[tensor], private[tensor]):
                leaked = [w for w in value_windows(values) if w in sent]
                assert not leaked, f"{name}: bytes of {tensor} occur in what the agent sent"
        # positive control: the generalist deltas' values are visible in the recording
        delta = wire.decode((tmp_path / f"state-{name}" / "sent" / f"round-{ROUNDS:06d}.safetensors").read_bytes())
        windows = [w for t in delta.values() for w in value_windows(torch.from_numpy(t))]
        found = sum(w in sent for w in windows)
        assert found >= 0.9 * len(windows), f"{name}: only {found}/{len(windows)} delta values seen in the recording"

    # -- no connection is held while training: a download and an upload never share one ---------------
    for name in DEVICES:
        payload = (tmp_path / f"state-{name}" / "sent" / f"round-{ROUNDS:06d}.safetensors").stat().st_size
        big = payload // 2  # a generalist (down) or a delta (up) of this size, not a few short calls
        uploads = [c for c in proxies[name].connections if c[0] > big]
        downloads = [c for c in proxies[name].connections if c[1] > big]
        assert len(uploads) >= ROUNDS and len(downloads) >= ROUNDS, proxies[name].connections
        assert not [c for c in uploads if c[1] > big], f"{name}: held a connection while training"
        assert not proxies[name].lingered(0.5), f"{name}: connections left open: {proxies[name].lingered(0.5)}"
