"""`comigs edge demo`: a coordinator and four device agents on this machine, against a local-only run.

What it does, each step logged under the run directory (`logs/`):

1. prepares the `languages` scenario (LibreOffice help in de/fr/it/nl, tokenised for SmolLM2) unless
   `--data` names a prepared scenario directory;
2. loads the base model once, writes the common initial generalist and scores every device's test
   split with the base model ("before");
3. creates a TLS certificate and a coordinator state directory with one token per device, and starts
   `comigs sync serve` on a free loopback port;
4. starts four `comigs edge run` processes with different expert counts (1, 2, 2 and 4 experts per
   MLP: 1,0 / 1,1 / 1,1 / 1,3) and follows the rounds until the coordinator says DONE;
5. trains the same devices local-only (`comigs train`, same steps, no sharing) for comparison;
6. scores every device again: CoMiGS (the final published generalist + the device's own specialists
   and router) and local-only, prints the table and writes `summary.json`;
7. exports device 0's trained model with `comigs export`.

Every device process is a separate OS process talking TLS gRPC on 127.0.0.1: exactly what would run
on real devices, minus the network.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from edge_runtime.agent.certificate import make_certificate

DEMO_EXPERTS = ("1,0", "1,1", "1,1", "1,3")  # 1, 2, 2 and 4 experts per MLP
DEFAULT_RUN_DIR = Path("runs/edge-demo")


@dataclasses.dataclass(frozen=True)
class DemoOptions:
    """The demo's schedule; the defaults are sized for about 15 minutes on a 2-core CPU with SmolLM2."""

    out: Path = DEFAULT_RUN_DIR
    data: Path | None = None
    model: str = "default"
    rounds: int = 3
    local_steps: int = 5
    batch_size: int = 4
    seq_len: int = 128
    router_every: int = 5
    router_steps: int = 2
    rank: int = 8
    max_chars_per_device: int = 300_000
    eval_tokens: int = 8192
    budget_mb: float | None = None
    export_formats: str = "pte"
    skip_local: bool = False
    skip_export: bool = False
    threads: int = 1


class DemoError(RuntimeError):
    """A step of the demo failed; the message names the log to read."""


def _say(text: str) -> None:
    print(text, flush=True)


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _comigs(*args: str) -> list[str]:
    return [sys.executable, "-m", "edge_runtime.cli", *args]


def _run_logged(command: list[str], log: Path, what: str) -> None:
    with log.open("ab") as f:
        code = subprocess.call(command, stdout=f, stderr=subprocess.STDOUT, env=_env())
    if code != 0:
        raise DemoError(f"{what} failed (exit {code}); see {log}:\n{log.read_text(errors='replace')[-2000:]}")


def device_dirs(scenario: Path) -> list[Path]:
    """The scenario's device directories (those holding train/valid/test.npy), in order."""
    found = sorted(p for p in scenario.iterdir() if p.is_dir() and (p / "train.npy").is_file())
    if len(found) < len(DEMO_EXPERTS):
        raise DemoError(f"{scenario} holds {len(found)} device directories with token splits; the demo needs "
                        f"{len(DEMO_EXPERTS)} (prepare one with `comigs data prepare --scenario languages`).")
    return found[:len(DEMO_EXPERTS)]


def _test_perplexity(model: Any, device: Path, o: DemoOptions) -> float:
    from edge_runtime.data.tokens import TokenSplit
    from edge_runtime.evaluation import perplexity

    tokens = TokenSplit.load(device / "test.npy").tokens
    split = TokenSplit(tokens[: o.eval_tokens + 1], name=f"{device.name}/test")
    return perplexity(model, split, seq_len=o.seq_len, batch_size=8).perplexity


def _model_with(base: Any, experts: str, rank: int, tensors: dict[str, Any]) -> Any:
    from edge_runtime import roles
    from edge_runtime.model.config import CoMiGSConfig
    from edge_runtime.model.inject import inject_comigs

    model = inject_comigs(copy.deepcopy(base), CoMiGSConfig.parse_experts(experts, rank=rank))
    roles.load_state_by_role(model, tensors, *roles.TRAINABLE_ROLES)
    return model


def run_edge_demo(o: DemoOptions) -> dict[str, Any]:
    """Run the whole demo; returns the summary (also written to OUT/summary.json)."""
    import numpy as np
    import torch
    from safetensors.numpy import save_file
    from safetensors.torch import load as load_tensors
    from safetensors.torch import load_file
    from tqdm import tqdm

    from edge_runtime import roles
    from edge_runtime.agent.loop import build_device_model
    from edge_runtime.agent.state import StateDir
    from edge_runtime.model.adapters import load_adapters, save_adapters
    from edge_runtime.model.config import CoMiGSConfig
    from edge_runtime.model.inject import inject_comigs
    from edge_runtime.model.loading import load_base_model
    from sync_service.auth import add_device
    from sync_service.store import Store

    started = time.perf_counter()
    run, logs = o.out, o.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, o.threads))

    # 1. data
    if o.data is not None:
        scenario = o.data
        _say(f"[1/7] using the prepared scenario in {scenario}")
    else:
        scenario = run / "data" / "languages"
        if not (scenario / "scenario.json").is_file():
            _say(f"[1/7] preparing the languages scenario ({o.max_chars_per_device:,} characters per device; "
                 f"log: {logs / 'data.log'}) ...")
            _run_logged(_comigs("data", "prepare", "--scenario", "languages", "--out", str(run / "data"),
                                "--max-chars-per-device", str(o.max_chars_per_device), "--seq-len", str(o.seq_len),
                                "--model", o.model, "--quiet"), logs / "data.log", "preparing the data")
        else:
            _say(f"[1/7] reusing the prepared languages scenario in {scenario}")
    devices = device_dirs(scenario)
    names = [f"device-{i}-{d.name.split('-', 1)[-1]}"[:64] for i, d in enumerate(devices)]

    # 2. base model, common initial generalist, "before" perplexities
    _say(f"[2/7] loading the base model {o.model!r} and scoring every device's test split ...")
    base, _ = load_base_model(o.model, with_tokenizer=False)
    init = build_device_model(o.model, "1,0", o.rank, seed=1234)
    initial = {n: t.numpy() for n, t in roles.generalist_state(init).items()}
    del init
    save_file(initial, str(run / "initial_generalist.safetensors"))
    before = {}
    for name, device in zip(names, devices, strict=True):
        before[name] = _test_perplexity(base, device, o)
        _say(f"      {name}: base model test perplexity {before[name]:.2f}")

    # 3. coordinator with TLS and device tokens
    _say("[3/7] starting the coordinator (TLS, one token per device) ...")
    cert, key = make_certificate(run / "tls")
    coordinator_dir = run / "coordinator"
    if coordinator_dir.exists():
        raise DemoError(f"{coordinator_dir} exists from an earlier run; use another --out or delete it.")
    store = Store.initialise(coordinator_dir, initial)
    tokens_dir = run / "tokens"
    tokens_dir.mkdir(exist_ok=True)
    for name in names:
        token_file = tokens_dir / f"{name}.token"
        token_file.write_text(add_device(store, name))
        token_file.chmod(0o600)
    store.close()
    ready = run / "coordinator-ready.json"
    ready.unlink(missing_ok=True)
    server_log = (logs / "coordinator.log").open("ab")
    server = subprocess.Popen(
        [sys.executable, "-m", "sync_service", "serve", "--state-dir", str(coordinator_dir), "--listen",
         "127.0.0.1:0", "--tls-cert", str(cert), "--tls-key", str(key), "--metrics-listen", "",
         "--ready-file", str(ready), "--min-devices", str(len(names)), "--rounds", str(o.rounds),
         "--round-timeout", "3600", "--local-steps", str(o.local_steps), "--router-every", str(o.router_every),
         "--router-steps", str(o.router_steps), "--batch-size", str(o.batch_size), "--poll-interval", "1",
         "--local-extra", f"total_steps={o.rounds * o.local_steps}"],
        stdout=server_log, stderr=subprocess.STDOUT, env=_env())
    agents: list[subprocess.Popen] = []
    local: list[subprocess.Popen] = []
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            if server.poll() is not None or time.monotonic() > deadline:
                raise DemoError(f"the coordinator did not start; see {logs / 'coordinator.log'}")
            time.sleep(0.1)
        target = f"127.0.0.1:{json.loads(ready.read_text())['port']}"
        _say(f"      coordinator on {target}; state in {coordinator_dir}")

        # 4. the four device agents
        _say(f"[4/7] starting {len(names)} device agents (experts per MLP: "
             f"{', '.join(str(sum(map(int, e.split(',')))) for e in DEMO_EXPERTS)}), {o.rounds} rounds x "
             f"{o.local_steps} local steps ...")
        for i, (name, device, experts) in enumerate(zip(names, devices, DEMO_EXPERTS, strict=True)):
            command = _comigs(
                "edge", "run", "--coordinator", target, "--token-file", str(tokens_dir / f"{name}.token"),
                "--ca-file", str(cert), "--data", str(device), "--experts", experts, "--rank", str(o.rank),
                "--model", o.model, "--state-dir", str(run / "devices" / name), "--seq-len", str(o.seq_len),
                "--seed", str(i), "--threads", str(o.threads), "--total-steps", str(o.rounds * o.local_steps))
            if o.budget_mb:
                command += ["--budget-mb", str(o.budget_mb)]
            with (logs / f"{name}.log").open("ab") as f:
                agents.append(subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=_env()))
        bar = tqdm(total=o.rounds * len(names), desc="uploads", unit="delta", dynamic_ncols=True)
        while any(a.poll() is None for a in agents):
            for a, name in zip(agents, names, strict=True):
                if a.poll() not in (None, 0):
                    raise DemoError(f"{name} failed (exit {a.returncode}); see {logs / f'{name}.log'}:\n"
                                    + (logs / f"{name}.log").read_text(errors="replace")[-2000:])
            store = Store(coordinator_dir)
            done = sum(store.count_uploads(r.round_id) for r in store.list_rounds())
            published = store.count_rounds("published")
            store.close()
            bar.n = min(done, bar.total)
            bar.set_postfix(published_rounds=published)
            bar.refresh()
            time.sleep(2)
        bar.close()
        if any(a.returncode != 0 for a in agents):
            raise DemoError(f"a device agent failed; see the logs in {logs}")

        # 5. local-only comparison
        if not o.skip_local:
            _say("[5/7] training the same devices local-only (no sharing, same steps) ...")
            for i, (name, device, experts) in enumerate(zip(names, devices, DEMO_EXPERTS, strict=True)):
                command = _comigs(
                    "train", "--data", str(device), "--out", str(run / "local" / name), "--model", o.model,
                    "--experts", experts, "--rank", str(o.rank), "--steps", str(o.rounds * o.local_steps),
                    "--batch-size", str(o.batch_size), "--micro-batch-size", str(o.batch_size), "--seq-len",
                    str(o.seq_len), "--router-every", str(o.router_every), "--router-steps", str(o.router_steps),
                    "--seed", str(i), "--save-every", "1000000")
                with (logs / f"local-{name}.log").open("ab") as f:
                    local.append(subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT,
                                                  env={**_env(), "OMP_NUM_THREADS": str(o.threads)}))
            for p, name in zip(local, names, strict=True):
                if p.wait() != 0:
                    raise DemoError(f"local-only training of {name} failed; see {logs / f'local-{name}.log'}")
        else:
            _say("[5/7] local-only comparison skipped (--skip-local)")
    finally:
        for p in agents + local:
            if p.poll() is None:
                p.kill()
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
        server_log.close()

    # 6. after
    _say("[6/7] scoring every device after training ...")
    store = Store(coordinator_dir)
    latest = store.latest_generalist()
    published = load_file(str(store.root / latest.path))
    store.close()
    results = []
    device0 = None
    for name, device, experts in zip(names, devices, DEMO_EXPERTS, strict=True):
        state = StateDir(run / "devices" / name)
        record = state.load()
        assert record is not None
        tensors = load_tensors(state.read_blob("tensors"))
        tensors.update(published)  # the final shared generalist + this device's own specialists and router
        model = _model_with(base, experts, o.rank, tensors)
        after = _test_perplexity(model, device, o)
        if device0 is None:
            device0 = model
        local_ppl = None
        if not o.skip_local:
            lm = inject_comigs(copy.deepcopy(base), CoMiGSConfig.parse_experts(experts, rank=o.rank))
            load_adapters(lm, run / "local" / name / "adapters")
            local_ppl = _test_perplexity(lm, device, o)
            del lm
        results.append({"device": name, "experts": experts, "train_tokens": int(record["history"][-1]["num_samples"]),
                        "rounds": record["completed_rounds"], "base_test_ppl": before[name],
                        "comigs_test_ppl": after, "local_only_test_ppl": local_ppl,
                        "peak_rss_mb": max(h.get("peak_rss_bytes") or 0 for h in record["history"]) / 2**20})

    # 7. export device 0
    artifacts = run / "artifacts" / names[0]
    if not o.skip_export:
        _say(f"[7/7] exporting {names[0]}'s model ({o.export_formats}) to {artifacts} (log: {logs / 'export.log'}) ...")
        adapters = save_adapters(device0, run / "devices" / names[0] / "adapters", metadata={"demo": "edge"})
        _run_logged(_comigs("export", "--model", o.model, "--adapters", str(adapters), "--formats", o.export_formats,
                            "--out", str(artifacts), "--overwrite"), logs / "export.log", "exporting device 0")
    else:
        _say("[7/7] export skipped (--skip-export)")

    summary = {"devices": results, "rounds": o.rounds, "local_steps": o.local_steps, "batch_size": o.batch_size,
               "seq_len": o.seq_len, "eval_tokens": o.eval_tokens, "model": o.model, "scenario": str(scenario),
               "artifacts": None if o.skip_export else str(artifacts),
               "seconds": round(time.perf_counter() - started, 1)}
    (run / "summary.json").write_text(json.dumps(summary, indent=2))
    _say("")
    _say(f"  test perplexity ({o.eval_tokens:,} test tokens per device)")
    _say(f"  {'device':<28} {'experts':>7} {'base':>9} {'local-only':>11} {'CoMiGS':>9} {'peak RSS':>9}")
    for r in results:
        local_text = f"{r['local_only_test_ppl']:11.2f}" if r["local_only_test_ppl"] is not None else f"{'-':>11}"
        _say(f"  {r['device']:<28} {sum(map(int, r['experts'].split(','))):>7} {r['base_test_ppl']:9.2f} "
             f"{local_text} {r['comigs_test_ppl']:9.2f} {r['peak_rss_mb']:7.0f}MB")
    mean = lambda key: float(np.mean([r[key] for r in results]))  # noqa: E731
    _say(f"  {'mean':<28} {'':>7} {mean('base_test_ppl'):9.2f} "
         + (f"{mean('local_only_test_ppl'):11.2f}" if not o.skip_local else f"{'-':>11}")
         + f" {mean('comigs_test_ppl'):9.2f}")
    _say(f"  run directory: {run} (logs in {logs}, summary.json), {summary['seconds'] / 60:.1f} min")
    return summary


def register_demo(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`comigs edge demo` (registered by edge_runtime.agent.cli)."""
    d = DemoOptions()
    demo = commands.add_parser(
        "demo", help="a coordinator and four device agents on this machine, next to a local-only run",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--out", type=Path, default=d.out, help="run directory (default: %(default)s)")
    demo.add_argument("--data", type=Path, help="a prepared scenario directory (default: prepare `languages`)")
    demo.add_argument("--model", default=d.model, help="base model (default: %(default)s = SmolLM2-135M)")
    demo.add_argument("--rounds", type=int, default=d.rounds, help="rounds (default: %(default)s)")
    demo.add_argument("--local-steps", type=int, default=d.local_steps, help="steps per round (default: %(default)s)")
    demo.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per step (default: %(default)s)")
    demo.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per sequence (default: %(default)s)")
    demo.add_argument("--router-every", type=int, default=d.router_every, help="(default: %(default)s)")
    demo.add_argument("--router-steps", type=int, default=d.router_steps, help="(default: %(default)s)")
    demo.add_argument("--rank", type=int, default=d.rank, help="LoRA rank (default: %(default)s)")
    demo.add_argument("--max-chars-per-device", type=int, default=d.max_chars_per_device,
                      help="text per device when preparing the data (default: %(default)s)")
    demo.add_argument("--eval-tokens", type=int, default=d.eval_tokens,
                      help="test tokens scored per device (default: %(default)s)")
    demo.add_argument("--budget-mb", type=float, default=None, help="memory budget of every agent")
    demo.add_argument("--export-formats", default=d.export_formats,
                      help="formats of device 0's export (default: %(default)s)")
    demo.add_argument("--skip-local", action="store_true", help="no local-only comparison")
    demo.add_argument("--skip-export", action="store_true", help="no export of device 0")
    demo.add_argument("--threads", type=int, default=d.threads, help="torch threads per process (default: %(default)s)")
    demo.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    options = DemoOptions(out=args.out, data=args.data, model=args.model, rounds=args.rounds,
                          local_steps=args.local_steps, batch_size=args.batch_size, seq_len=args.seq_len,
                          router_every=args.router_every, router_steps=args.router_steps, rank=args.rank,
                          max_chars_per_device=args.max_chars_per_device, eval_tokens=args.eval_tokens,
                          budget_mb=args.budget_mb, export_formats=args.export_formats, skip_local=args.skip_local,
                          skip_export=args.skip_export, threads=args.threads)
    try:
        run_edge_demo(options)
    except DemoError as exc:
        print(f"comigs edge demo: error: {exc}", file=sys.stderr)
        return 1
    return 0
