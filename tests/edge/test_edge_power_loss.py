"""Power loss: SIGKILL the agent at random points ten times; the run still completes every round exactly once.

The killed run must end with the same number of completed rounds as an uninterrupted one, exactly one
upload per round at the coordinator (re-sends after a kill are answered as duplicates of the original
acknowledgement and counted once), a state directory that verifies and loads, and, because every
completed step was committed and resumed from, the very same trained tensors as a run that was never
interrupted.
"""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import torch

from edge_runtime.agent.loop import DeviceAgent

from .edge_helpers import (
    agent_command,
    agent_options,
    agent_state,
    initial_generalist,
    inprocess_coordinator,
    make_device_data,
    start_agent,
    start_coordinator,
)

ROUNDS, LOCAL_STEPS, BATCH, ROUTER_EVERY, ROUTER_STEPS = 12, 10, 4, 4, 2
# Where each kill is aimed. "start": a random instant after launch, during imports, model and state loading
# or registering (at the latest shortly after registering). Otherwise a random instant shortly after the agent
# printed that line, so kills also land in training steps and commits, right after a download, and between an
# upload and its commit (the re-send case). The order bounds how far the run gets before the last kill.
ANCHORS = {"start": (0.3, 3.0), "registered with": (0.0, 0.4), "uploading the generalist delta": (0.0, 0.08),
           "downloading generalist": (0.0, 0.08)}
PLAN = ["start", "registered with", "uploading the generalist delta", "downloading generalist", "registered with",
        "start", "uploading the generalist delta", "downloading generalist", "registered with", "start"]
KILLS = len(PLAN)


def _wait_for_line(log: Path, text: str, count: int, process, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and log.read_text(errors="replace").count(text) >= count:
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.02)
    raise AssertionError(f"no {text!r} in {log} after {timeout}s")


def test_sigkill_ten_times_loses_nothing_and_uploads_once(tmp_path: Path, tls, model_dir: Path) -> None:
    generalist0 = initial_generalist(model_dir)
    data = make_device_data(tmp_path / "data", seed=3)
    coordinator = start_coordinator(tmp_path / "killed", generalist0, ["dev"], tls=tls, args=[
        "--min-devices", "1", "--rounds", str(ROUNDS), "--local-steps", str(LOCAL_STEPS), "--router-every",
        str(ROUTER_EVERY), "--router-steps", str(ROUTER_STEPS), "--batch-size", str(BATCH), "--round-timeout", "300"])
    state_dir, log = tmp_path / "killed" / "agent-state", tmp_path / "killed" / "agent.log"
    command = agent_command(coordinator.target, coordinator.tokens["dev"], data, state_dir, model_dir, tls=tls)
    rng = random.Random(20250101)
    schedule = []
    try:
        for anchor in PLAN:
            seen = log.read_text(errors="replace").count(anchor) if log.exists() else 0
            process = start_agent(command, log)
            delay = rng.uniform(*ANCHORS[anchor])
            if anchor == "start":
                registered = seen_registered = log.read_text(errors="replace").count("registered with")
                launched = time.monotonic()
                while time.monotonic() - launched < delay and process.poll() is None:
                    registered = log.read_text(errors="replace").count("registered with")
                    if registered > seen_registered:  # started faster than the delay: kill soon after registering
                        time.sleep(rng.uniform(0.0, 0.3))
                        break
                    time.sleep(0.02)
                alive = True
            else:
                alive = _wait_for_line(log, anchor, seen + 1, process)
                time.sleep(delay)
            if not alive or process.poll() is not None:
                raise AssertionError(f"the agent finished before kill {len(schedule) + 1}; schedule {schedule}: "
                                     f"{log.read_text()[-2000:]}")
            process.send_signal(signal.SIGKILL)
            process.wait()
            schedule.append(f"{anchor}+{delay:.2f}s")
            with log.open("a") as f:
                f.write(f"\n--- SIGKILL {len(schedule)} ({anchor}+{delay:.2f}s) ---\n")
        process = start_agent(command, log)
        assert process.wait(120) == 0, f"schedule {schedule}\n{log.read_text()[-3000:]}\n{coordinator.log()}"
    finally:
        if process.poll() is None:
            process.kill()
        coordinator.stop()

    text = log.read_text()
    assert text.count("--- SIGKILL") == KILLS
    assert f"the coordinator says training is done; {ROUNDS} round(s) completed" in text
    store = coordinator.store()
    try:
        assert store.count_rounds("published") == ROUNDS
        for round_id in range(1, ROUNDS + 1):
            uploads = store.uploads_for_round(round_id)
            assert [u.device_id for u in uploads] == ["dev"], (round_id, uploads)
    finally:
        store.close()
    record, tensors = agent_state(state_dir)
    assert record["completed_rounds"] == ROUNDS
    assert [h["id"] for h in record["history"] if h["outcome"] == "uploaded"] == list(range(1, ROUNDS + 1))
    assert all(h["steps_done"] == LOCAL_STEPS for h in record["history"])

    # the same device never interrupted (in-process: no start-up cost) ends with identical tensors
    reference = inprocess_coordinator(tmp_path / "reference", generalist0, ["dev"], tls, rounds=ROUNDS,
                                      local_steps=LOCAL_STEPS, batch_size=BATCH, router_every=ROUTER_EVERY,
                                      router_steps=ROUTER_STEPS)
    threads = torch.get_num_threads()
    try:
        options = agent_options(reference.target, reference.tokens["dev"], data, tmp_path / "reference" / "state",
                                tls, model=str(model_dir), threads=1)
        assert DeviceAgent(options).run() == 0
    finally:
        torch.set_num_threads(threads)
        reference.close()
    ref_record, ref_tensors = agent_state(tmp_path / "reference" / "state")
    assert ref_record["completed_rounds"] == ROUNDS
    assert set(ref_tensors) == set(tensors)
    for name, value in tensors.items():
        assert torch.equal(value, ref_tensors[name]), f"{name} differs from the uninterrupted run ({schedule})"
    for killed, ref in zip(record["history"], ref_record["history"], strict=True):
        assert killed["train_loss"] == ref["train_loss"]
