"""Where each server's CPU goes per upload: split by thread, trivial servicer vs hash+store floor vs coordinator.

Runs `bench_sync.py`'s burst (N TLS devices ask for their task, hang up, then all upload one SmolLM2-sized
delta at once) against the three servers of that benchmark, interleaved, and reads every server thread's
CPU time and context switches from /proc before and after each burst. Threads are grouped by their OS
name (`sync_service/thread_names.py`): "sync-rpc" are the handler threads (the three servers share the
thread pool setup), "event_engine" and the like are gRPC core's own threads (TLS, HTTP/2, polling),
"python" are Python threads without an OS name (gRPC's message-delivery thread and the idle main
thread); "(threads that ended)" is the process's CPU not found in a live thread: threads that exited
during the burst, plus rounding (each thread counts in clock ticks, 10 ms, so few devices blur it).
The bench process's own CPU is reported as "client" (the devices' threads).

The ratio and the totals are noisy on a shared VM (compare servers within one run, not across runs); the
split is what this is for: what the coordinator spends beyond gRPC itself, and where. Linux only.

    python benchmarks/probe_sync_cpu.py [--devices 200] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sync import (  # noqa: E402
    DISTINCT_DELTAS,
    make_cert,
    run_uploads,
    smollm2_shapes,
    start_coordinator,
    start_reference_server,
    wait_published,
    wait_ready,
)

from edge_runtime.sync_client import DEFAULT_CHUNK_BYTES  # noqa: E402
from sync_service import encoding  # noqa: E402
from sync_service.allocator import DEFAULT_ARENAS  # noqa: E402
from sync_service.auth import add_device  # noqa: E402
from sync_service.store import Store  # noqa: E402

SERVERS = ("trivial", "floor", "coordinator")
ENDED = "(threads that ended)"


def thread_cpu(pid: int) -> tuple[Counter, int]:
    """CPU seconds per thread group (OS name without its trailing number) and context switches, of `pid`."""
    tick = os.sysconf("SC_CLK_TCK")
    cpu: Counter = Counter()
    switches = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
            status = (task / "status").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        name = re.sub(r"[_-]?\d+$", "", stat[stat.index("(") + 1 : stat.rindex(")")]) or "?"
        fields = stat.rsplit(")", 1)[1].split()
        cpu[name] += (int(fields[11]) + int(fields[12])) / tick
        switches += sum(int(line.split()[1]) for line in status.splitlines() if "ctxt_switches" in line)
    return cpu, switches


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/probe_sync_cpu.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--devices", type=int, default=200, help="simulated devices uploading at once")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved bursts per server (medians)")
    parser.add_argument("--max-workers", type=int, default=16, help="handler threads of all three servers")
    parser.add_argument("--upload-slots", type=int, default=None, help="the coordinator's (default: its own)")
    parser.add_argument("--max-connections", type=int, default=None, help="the coordinator's (default: its own)")
    parser.add_argument("--malloc-arenas", type=int, default=DEFAULT_ARENAS, help="glibc arenas, all servers")
    args = parser.parse_args(argv)
    if not sys.platform.startswith("linux"):
        parser.error("reads per-thread CPU from /proc: Linux only")
    if args.devices < 1 or args.repeat < 1:
        parser.error("--devices and --repeat must be >= 1")

    shapes = smollm2_shapes()
    rng = np.random.default_rng(0)
    payloads = [
        encoding.encode({n: rng.normal(0, 1e-3, size=s).astype(np.float32) for n, s in shapes.items()}, "fp32")
        for _ in range(DISTINCT_DELTAS)
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in SERVERS}
    with tempfile.TemporaryDirectory(prefix="probe-sync-cpu-") as tmp_name:
        tmp = Path(tmp_name)
        cert, key, cert_pem = make_cert(tmp)
        store = Store.initialise(tmp / "state", {n: np.zeros(s, np.float32) for n, s in shapes.items()})
        tokens = {f"device-{i:04d}": add_device(store, f"device-{i:04d}") for i in range(args.devices)}
        store.close()
        processes = {
            mode: start_reference_server(mode_arg, cert, key, tmp, args.max_workers, args.malloc_arenas, env)
            for mode, mode_arg in (("trivial", "trivial"), ("floor", "store"))
        }
        processes["coordinator"] = start_coordinator(tmp / "state", cert, key, tmp, args, env)
        try:
            infos = {name: wait_ready(ready_file, p, log) for name, (p, ready_file, log) in processes.items()}
            for rep in range(1, args.repeat + 1):
                for name in SERVERS:
                    pid = processes[name][0].pid
                    before: list = []
                    wall, _, server_cpu, client_cpu = run_uploads(
                        f"127.0.0.1:{infos[name]['port']}",
                        cert_pem,
                        tokens,
                        payloads,
                        DEFAULT_CHUNK_BYTES,
                        pid,
                        lambda pid=pid, before=before: before.append(thread_cpu(pid)),
                        round_id=rep,
                        base_version=rep - 1,
                    )
                    (cpu0, switches0), (cpu1, switches1) = before[0], thread_cpu(pid)
                    per_upload = {group: 1e3 * (cpu1[group] - cpu0[group]) / args.devices for group in cpu1}
                    per_upload[ENDED] = 1e3 * server_cpu / args.devices - sum(per_upload.values())
                    per_upload |= {
                        "server (all threads)": 1e3 * server_cpu / args.devices,
                        "client (the devices' threads)": 1e3 * client_cpu / args.devices,
                        "context switches (count)": (switches1 - switches0) / args.devices,
                        "wall (s)": wall,
                    }
                    for group, value in per_upload.items():
                        samples[name].setdefault(group, []).append(value)
                    if name == "coordinator":
                        wait_published(infos[name]["metrics_port"], rep)
                    print(f"  burst {rep} {name}: {wall:.2f} s, server {1e3 * server_cpu / args.devices:.1f} ms/upload")
        finally:
            for process, _, _ in processes.values():
                process.terminate()
                process.wait(60)
    print_table(samples, args)
    return 0


def print_table(samples: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> None:
    medians = {name: {g: statistics.median(v) for g, v in groups.items()} for name, groups in samples.items()}
    fixed = ["server (all threads)", "client (the devices' threads)", "context switches (count)", "wall (s)"]
    groups = sorted(
        {g for m in medians.values() for g, v in m.items() if g not in fixed and abs(v) >= 0.05},
        key=lambda g: -medians["coordinator"].get(g, 0.0),
    )
    print(f"\nCPU ms per upload, medians of {args.repeat} bursts of {args.devices} devices")
    print(f"| {'thread group':32s} | " + " | ".join(f"{name:>11s}" for name in SERVERS) + " |")
    print(f"|{'-' * 34}|" + "|".join("-" * 13 for _ in SERVERS) + "|")
    for group in groups + fixed:
        cells = " | ".join(f"{medians[name].get(group, 0.0):11.2f}" for name in SERVERS)
        print(f"| {group:32s} | {cells} |")
    ratios = [t / c for t, c in zip(samples["trivial"]["wall (s)"], samples["coordinator"]["wall (s)"], strict=True)]
    print(f"\ningest / raw gRPC per burst (noisy): {' '.join(f'{r:.2f}' for r in ratios)}")


if __name__ == "__main__":
    raise SystemExit(main())
