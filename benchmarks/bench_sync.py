"""Benchmark the sync coordinator: many devices uploading SmolLM2-sized 1G1S generalist deltas at once.

What it measures, in one run on this machine (loopback, TLS, coordinator in its own process):

* ingest: N devices (threads, one TLS connection each) ask for their task, hang up while they "train" (as
  the edge agent does), then all reconnect and upload one fp32 delta each into one round of a real
  coordinator (`python -m sync_service serve`: validation, hashing, fsync, SQLite commit, then the round's
  aggregation); ingest MB/s, uploads/s, p50/p99 upload latency;
* the practical limit: the same client code sending the same bytes to a trivial servicer (a gRPC server in
  its own process whose UploadDelta only reads the stream), the same TLS and thread settings;
* server memory: peak RSS (VmHWM, ingest + aggregation) minus the idle RSS, over one delta's size;
* int8: payload bytes over fp32 bytes, and the reconstruction error.

The delta: SmolLM2-135M's 1G1S generalist as the model code names and shapes it: 30 layers x (gate, up,
down) LoRA rank 8, d_model 576, d_ff 1536 (1,520,640 floats, 6.08 MB).
Targets (issue 3): ingest >= 0.7 x raw gRPC, peak RSS <= 4 x delta + idle, int8 <= 0.27 x fp32.
Results are merged into benchmarks/results.json under "sync" (other sections are kept).

    python benchmarks/bench_sync.py [--devices 200]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_file import RESULTS, update_section  # noqa: E402

from edge_runtime import roles  # noqa: E402
from edge_runtime.agent.certificate import make_certificate  # noqa: E402
from edge_runtime.sync_client import DEFAULT_CHUNK_BYTES, RetryPolicy, SyncClient  # noqa: E402
from sync_service import encoding  # noqa: E402
from sync_service.allocator import DEFAULT_ARENAS, limit_malloc_arenas  # noqa: E402
from sync_service.auth import add_device  # noqa: E402
from sync_service.store import Store  # noqa: E402

RANK = 8
TARGETS = {"ingest_over_raw_grpc": 0.7, "server_rss_over_delta": 4.0, "int8_bytes_over_fp32": 0.27}
DISTINCT_DELTAS = 8


def smollm2_shapes() -> dict[str, tuple[int, ...]]:
    """The generalist a SmolLM2-135M device with one generalist and one specialist (rank 8) uploads: the
    names and shapes the model code gives it (built without weights), so the payload is a real one."""
    from edge_runtime.model.config import CoMiGSConfig  # torch: only here, never in the servers
    from edge_runtime.model.factory import generalist_shapes

    return generalist_shapes("default", CoMiGSConfig(n_generalists=1, n_specialists=1, rank=RANK))


def make_cert(directory: Path) -> tuple[Path, Path, bytes]:
    cert, key = make_certificate(directory, days=1)
    return cert, key, cert.read_bytes()


# ------------------------------------------------------------------------------------ trivial servicer


def serve_raw(
    cert: str,
    key: str,
    ready_file: str,
    max_workers: int,
    mode: str = "trivial",
    *,
    plaintext: bool = False,
    extra_options: Sequence[tuple[str, int]] = (),
    malloc_arenas: int = 0,
) -> None:
    """A reference servicer with exactly the coordinator's transport (options, TLS, thread pool).

    mode "trivial": UploadDelta only reads the stream (the practical limit of gRPC on this machine).
    mode "store": UploadDelta also does the part of the coordinator's work no implementation can skip
    without giving up integrity or durability: SHA-256 of the bytes compared with the header's, the bytes
    written to a temp file, fsync, rename, directory fsync (no auth, no validation, no database).
    `plaintext` and `extra_options` are for `probe_sync_memory.py` (TLS's share, gRPC option trials);
    `malloc_arenas` caps glibc's arenas as `comigs sync serve --malloc-arenas` does (same process setup).
    """
    limit_malloc_arenas(malloc_arenas)  # before any thread
    import hashlib
    import tempfile as tempfile_module

    import grpc

    from sync_service.durable import publish_file
    from sync_service.proto import sync_pb2 as pb
    from sync_service.proto import sync_pb2_grpc as pb_grpc

    store_dir = Path(tempfile_module.mkdtemp(prefix="bench-store-", dir=Path(ready_file).parent))

    class Trivial(pb_grpc.SyncServiceServicer):
        def GetTask(self, request, context):  # noqa: N802 - gRPC method name
            return pb.GetTaskResponse()

        def AcquireUploadSlot(self, request, context):  # noqa: N802 - the client asks once per upload
            return pb.AcquireUploadSlotResponse(granted=True, retry_after_ms=60_000)

        def UploadDelta(self, request_iterator, context):  # noqa: N802
            if mode == "store":
                return self._store(request_iterator, context)
            received = 0
            for message in request_iterator:
                received += len(message.chunk.data)
            return pb.UploadDeltaResponse(accepted_bytes=received)

        @staticmethod
        def _store(request_iterator, context):
            first = next(request_iterator)
            digest = hashlib.sha256()
            temp = store_dir / f"{os.urandom(8).hex()}.part"
            received = 0
            with open(temp, "wb") as handle:
                for message in request_iterator:
                    data = message.chunk.data
                    digest.update(data)
                    handle.write(data)
                    received += len(data)
                handle.flush()
                os.fsync(handle.fileno())
            if digest.digest() != first.header.payload_sha256:
                temp.unlink()
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "checksum mismatch")
            final = store_dir / "done" / temp.with_suffix(".safetensors").name
            publish_file(temp, final)
            return pb.UploadDeltaResponse(accepted_bytes=received)

    from sync_service.config import ServerConfig
    from sync_service.server import grpc_server_options
    from sync_service.thread_names import name_current_thread

    max_message = ServerConfig.__dataclass_fields__["max_message_bytes"].default
    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix="sync-rpc", initializer=name_current_thread
        ),
        options=grpc_server_options(max_message) + list(extra_options),
    )  # exactly the coordinator's transport
    pb_grpc.add_SyncServiceServicer_to_server(Trivial(), server)
    if plaintext:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        credentials = grpc.ssl_server_credentials([(Path(key).read_bytes(), Path(cert).read_bytes())])
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    Path(ready_file).write_text(json.dumps({"port": port, "pid": os.getpid()}))
    server.wait_for_termination()


def start_coordinator(
    state_dir: Path, cert: Path, key: Path, tmp: Path, args: argparse.Namespace, env: dict[str, str]
) -> tuple[subprocess.Popen, Path, Path]:
    """`comigs sync serve` on a free loopback port with TLS, one round per burst of `args.devices` uploads,
    with the benchmark's server flags; returns (process, ready file, log file)."""
    ready_file, log_file = tmp / "ready.json", tmp / "server.log"
    command = [sys.executable, "-m", "sync_service", "serve", "--state-dir", str(state_dir)]
    command += ["--listen", "127.0.0.1:0", "--tls-cert", str(cert), "--tls-key", str(key)]
    command += ["--metrics-listen", "127.0.0.1:0", "--ready-file", str(ready_file), "--log-level", "warning"]
    command += ["--min-devices", str(args.devices), "--round-timeout", "3600", "--rounds", str(args.repeat)]
    command += ["--max-workers", str(args.max_workers), "--malloc-arenas", str(args.malloc_arenas)]
    if args.upload_slots is not None:
        command += ["--upload-slots", str(args.upload_slots)]
    if args.max_connections is not None:
        command += ["--max-connections", str(args.max_connections)]
    with open(log_file, "wb") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=log)
    return process, ready_file, log_file


def start_reference_server(
    mode: str, cert: Path, key: Path, tmp: Path, max_workers: int, malloc_arenas: int, env: dict[str, str]
) -> tuple[subprocess.Popen, Path, Path]:
    """`serve_raw` in its own process (mode "trivial" or "store"); returns (process, ready file, log file)."""
    ready_file, log_file = tmp / f"{mode}.json", tmp / f"{mode}.log"
    with open(log_file, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, __file__, "--serve-raw", str(cert), str(key), str(ready_file)]
            + [str(max_workers), mode, str(malloc_arenas)],
            env=env,
            stdout=log,
            stderr=log,
        )
    return process, ready_file, log_file


# ------------------------------------------------------------------------------------ measurement


def rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found for pid {pid}")


def wait_ready(ready: Path, process: subprocess.Popen, log: Path) -> dict:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if ready.exists() and ready.read_text():
            return json.loads(ready.read_text())
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-3000:]}")
        time.sleep(0.05)
    raise RuntimeError("server did not start")


def run_uploads(
    target: str,
    cert_pem: bytes,
    tokens: dict[str, str],
    payloads: list[bytes],
    chunk_bytes: int,
    server_pid: int,
    at_start_line: Callable[[], None] = lambda: None,
    *,
    round_id: int = 1,
    base_version: int = 0,
) -> tuple[float, list[float], float, float]:
    """All devices ask for their task and hang up (then `at_start_line` runs), then all upload at once.

    A device trains for minutes between its task and its upload, and the edge agent hangs up meanwhile
    (edge_runtime/agent/loop.py), so each device reconnects (TCP + TLS) for its upload, as in a real round.
    Returns (wall seconds from the start signal to the last acknowledgement, per-upload latencies, server
    CPU seconds and client (this process) CPU seconds over that same interval, which includes those
    reconnections but not the coordinator's aggregation afterwards).
    """
    names = sorted(tokens)
    clients = [
        SyncClient(
            target,
            tokens[name],
            device_id=name,
            root_certificates=cert_pem,
            chunk_bytes=chunk_bytes,
            retry=RetryPolicy(max_attempts=8, initial_backoff_s=0.2),
            transfer_timeout_s=600,
        )
        for name in names
    ]
    asked = threading.Barrier(len(clients) + 1)
    start_line = threading.Barrier(len(clients) + 1)
    latencies: list[float] = [0.0] * len(clients)
    errors: list[BaseException] = []

    def device(index: int) -> None:
        client = clients[index]
        try:
            client.get_task()
        except Exception as exc:  # the trivial servicer has no auth: any answer will do
            if "GetTask" not in str(exc):
                errors.append(exc)
        client.close()  # training: the agent holds no connection meanwhile
        asked.wait()
        start_line.wait()
        started = time.perf_counter()
        try:
            client.upload_encoded(
                round_id,
                base_version,
                payloads[index % len(payloads)],
                64,
                encoding="fp32",
                idempotency_key=f"bench-r{round_id}-{index}",
            )
        except BaseException as exc:
            errors.append(exc)
        latencies[index] = time.perf_counter() - started

    threads = [threading.Thread(target=device, args=(i,)) for i in range(len(clients))]
    for thread in threads:
        thread.start()
    asked.wait()
    at_start_line()
    server_cpu, client_cpu = cpu_seconds(server_pid), time.process_time()
    start_line.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    server_cpu, client_cpu = cpu_seconds(server_pid) - server_cpu, time.process_time() - client_cpu
    for client in clients:
        client.close()
    if errors:
        raise RuntimeError(f"{len(errors)} uploads failed; first: {errors[0]!r}")
    return wall, latencies, server_cpu, client_cpu


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_published(metrics_port: int, rounds: int, timeout: float = 600) -> float:
    """Wait until `rounds` rounds are published; return the total aggregation seconds so far."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = _scrape(metrics_port)
        if metrics.get("comigs_sync_aggregation_seconds_count", 0) >= rounds:
            return metrics["comigs_sync_aggregation_seconds_sum"]
        time.sleep(0.1)
    raise RuntimeError(f"round {rounds} was not published")


class SlotSampler:
    """Samples the coordinator's upload-slot gauges every 50 ms during its upload runs.

    Reports how many streams were being received on average while devices were queued: with every
    slot in use this is close to the slot count; much lower means slots sat free while devices waited.
    """

    def __init__(self, metrics_port: int) -> None:
        self._port = metrics_port
        self._streaming: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            values = _scrape(self._port)
            if values.get("comigs_sync_upload_slots_waiting", 0) > 0:
                self._streaming.append(values.get("comigs_sync_upload_slots_streaming", 0.0))

    def mean_streaming(self) -> float | None:
        return round(statistics.mean(self._streaming), 2) if self._streaming else None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/bench_sync.py",
        description="Ingest throughput, latency and memory of the sync coordinator with many concurrent "
        "devices uploading SmolLM2-sized 1G1S deltas, against raw gRPC streaming of the same bytes; "
        "int8 size and error. "
        "Merges its figures into benchmarks/results.json under 'sync'.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--devices", type=int, default=200, help="simulated devices uploading concurrently")
    parser.add_argument(
        "--max-workers", type=int, default=16, help="server gRPC handler threads (both servers)"
    )
    parser.add_argument(
        "--upload-slots",
        type=int,
        default=None,
        help="the coordinator's upload slots (default: its own default, max-workers - 4; 0: no admission)",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=None,
        help="the coordinator's connection limit (default: its own default; 0: no limit)",
    )
    parser.add_argument(
        "--malloc-arenas",
        type=int,
        default=DEFAULT_ARENAS,
        help="glibc malloc arenas of the coordinator and both reference servers (0: glibc's default)",
    )
    parser.add_argument(
        "--chunk-kib",
        type=int,
        default=DEFAULT_CHUNK_BYTES // 1024,
        help="upload chunk size (the SyncClient default unless given)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=5,
        help="interleaved repetitions of (raw gRPC, hash+store floor, coordinator); medians are reported",
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=RESULTS,
        help="JSON file to merge the 'sync' section into",
    )
    parser.add_argument("--no-save", action="store_true", help="print only; do not touch the results file")
    parser.add_argument(
        "--serve-raw", nargs=6, metavar=("CERT", "KEY", "READY", "WORKERS", "MODE", "ARENAS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.serve_raw:
        cert, key, ready, workers, mode, arenas = args.serve_raw
        serve_raw(cert, key, ready, int(workers), mode, malloc_arenas=int(arenas))
        return 0
    if args.devices < 1 or args.repeat < 1:
        parser.error("--devices and --repeat must be >= 1")

    shapes = smollm2_shapes()
    rng = np.random.default_rng(0)
    deltas = [
        {n: rng.normal(0, 1e-3, size=s).astype(np.float32) for n, s in shapes.items()}
        for _ in range(DISTINCT_DELTAS)
    ]
    payloads = [encoding.encode(delta, "fp32") for delta in deltas]
    delta_bytes = len(payloads[0])

    # int8: size and reconstruction error on a realistic delta.
    int8 = encoding.encode(deltas[0], "int8")
    restored = encoding.decode(int8)
    err2 = sum(float(np.sum((restored[n].astype(np.float64) - deltas[0][n]) ** 2)) for n in shapes)
    norm2 = sum(float(np.sum(deltas[0][n].astype(np.float64) ** 2)) for n in shapes)
    int8_rel_l2 = (err2 / norm2) ** 0.5
    int8_max_abs = max(float(np.max(np.abs(restored[n] - deltas[0][n]))) for n in shapes)
    max_abs = max(float(np.max(np.abs(deltas[0][n]))) for n in shapes)

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with tempfile.TemporaryDirectory(prefix="bench-sync-") as tmp_name:
        tmp = Path(tmp_name)
        cert, key, cert_pem = make_cert(tmp)
        generalist = {
            n: (rng.uniform(-0.04, 0.04, size=s) if n.endswith(roles.GENERALIST_A) else np.zeros(s)).astype(np.float32)
            for n, s in shapes.items()
        }
        store = Store.initialise(tmp / "state", generalist)
        tokens = {f"device-{i:04d}": add_device(store, f"device-{i:04d}") for i in range(args.devices)}
        store.close()

        chunk = args.chunk_kib * 1024

        def reference_server(mode: str) -> tuple[subprocess.Popen, Path, Path]:
            return start_reference_server(mode, cert, key, tmp, args.max_workers, args.malloc_arenas, env)

        raw, raw_ready, raw_log = reference_server("trivial")
        floor, floor_ready, floor_log = reference_server("store")
        server, ready, server_log = start_coordinator(tmp / "state", cert, key, tmp, args, env)
        try:
            raw_info = wait_ready(raw_ready, raw, raw_log)
            floor_info = wait_ready(floor_ready, floor, floor_log)
            info = wait_ready(ready, server, server_log)
            time.sleep(0.5)
            raw_idle_kib, idle_kib = rss_kib(raw.pid, "VmRSS"), rss_kib(server.pid, "VmRSS")
            start_line_kib = [0]

            slot_sampler = SlotSampler(info["metrics_port"])

            def measure_start_line() -> None:  # every device has asked for its task and hung up
                if not start_line_kib[0]:
                    time.sleep(0.3)
                    start_line_kib[0] = rss_kib(server.pid, "VmRSS")
                slot_sampler.start()

            runs: dict[str, dict[str, list]] = {
                name: {"wall": [], "latency": [], "server_cpu": [], "client_cpu": []}
                for name in ("raw", "floor", "coordinator")
            }
            aggregations: list[float] = []
            ingest_peak_kib = 0
            for rep in range(1, args.repeat + 1):  # interleaved, so machine noise hits all alike
                for name, port, pid, hook in (
                    ("raw", raw_info["port"], raw.pid, lambda: None),
                    ("floor", floor_info["port"], floor.pid, lambda: None),
                    ("coordinator", info["port"], server.pid, measure_start_line),
                ):
                    wall, lat, server_cpu, client_cpu = run_uploads(
                        f"127.0.0.1:{port}",
                        cert_pem,
                        tokens,
                        payloads,
                        chunk,
                        pid,
                        hook,
                        base_version=rep - 1,
                        round_id=rep,
                    )
                    if name == "coordinator":
                        slot_sampler.stop()
                    run = runs[name]
                    run["wall"].append(wall)
                    run["latency"] += lat
                    run["server_cpu"].append(server_cpu)
                    run["client_cpu"].append(client_cpu)
                ingest_peak_kib = max(ingest_peak_kib, rss_kib(server.pid, "VmHWM"))
                aggregations.append(wait_published(info["metrics_port"], rep) - sum(aggregations))
                mbps = {name: args.devices * delta_bytes / 1e6 / run["wall"][-1] for name, run in runs.items()}
                print(
                    f"  repeat {rep}: ingest {mbps['coordinator']:.1f} MB/s, raw gRPC {mbps['raw']:.1f} MB/s, "
                    f"hash+store floor {mbps['floor']:.1f} MB/s",
                    flush=True,
                )
            peak_kib = rss_kib(server.pid, "VmHWM")
            polls = {
                outcome: _scrape(info["metrics_port"]).get(
                    f'comigs_sync_upload_slot_requests_total{{outcome="{outcome}"}}', 0.0
                )
                for outcome in ("granted", "queued")
            }
            raw_peak_kib = rss_kib(raw.pid, "VmHWM")
        finally:
            for process in (raw, floor, server):
                process.terminate()
                process.wait(60)

    total_mb = args.devices * delta_bytes / 1e6
    raw_walls, floor_walls, walls = (runs[name]["wall"] for name in ("raw", "floor", "coordinator"))
    ratios = [raw_wall / wall for raw_wall, wall in zip(raw_walls, walls, strict=True)]
    floor_ratios = [raw_wall / wall for raw_wall, wall in zip(raw_walls, floor_walls, strict=True)]
    wall, raw_wall = statistics.median(walls), statistics.median(raw_walls)
    latencies, raw_latencies = runs["coordinator"]["latency"], runs["raw"]["latency"]

    def cpu_ms(name: str, side: str) -> float:
        return round(1000 * statistics.median(runs[name][side]) / args.devices, 2)

    def cores(name: str) -> float:  # CPU cores kept busy by server + clients during the uploads
        run = runs[name]
        return round(
            statistics.median(
                (s + c) / w for s, c, w in zip(run["server_cpu"], run["client_cpu"], run["wall"], strict=True)
            ),
            2,
        )

    grpc_only = (raw_peak_kib - raw_idle_kib) * 1024 / delta_bytes
    figures = {
        "ingest_over_raw_grpc": round(statistics.median(ratios), 3),
        "server_rss_over_delta": round((peak_kib - idle_kib) * 1024 / delta_bytes, 3),
        "int8_bytes_over_fp32": round(len(int8) / delta_bytes, 4),
        "ingest_over_raw_grpc_each_repeat": [round(r, 3) for r in ratios],
        "hash_store_floor_over_raw_grpc": round(statistics.median(floor_ratios), 3),
        "hash_store_floor_over_raw_grpc_each_repeat": [round(r, 3) for r in floor_ratios],
        "server_rss_over_delta_from_start_line": round((peak_kib - start_line_kib[0]) * 1024 / delta_bytes, 3),
        "trivial_servicer_rss_over_delta": round(grpc_only, 3),
        "coordinator_own_rss_over_delta": round((peak_kib - idle_kib) * 1024 / delta_bytes - grpc_only, 3),
        "devices": args.devices,
        "repeats": args.repeat,
        "delta_bytes": delta_bytes,
        "chunk_bytes": chunk,
        "ingest_MBps": round(total_mb / wall, 1),
        "raw_grpc_MBps": round(total_mb / raw_wall, 1),
        "uploads_per_s": round(args.devices / wall, 2),
        "raw_grpc_uploads_per_s": round(args.devices / raw_wall, 2),
        "upload_latency_p50_s": round(percentile(latencies, 0.5), 3),
        "upload_latency_p99_s": round(percentile(latencies, 0.99), 3),
        "raw_latency_p50_s": round(percentile(raw_latencies, 0.5), 3),
        "raw_latency_p99_s": round(percentile(raw_latencies, 0.99), 3),
        "hash_store_floor_MBps": round(total_mb / statistics.median(floor_walls), 1),
        "server_cpu_ms_per_upload": cpu_ms("coordinator", "server_cpu"),
        "raw_server_cpu_ms_per_upload": cpu_ms("raw", "server_cpu"),
        "floor_server_cpu_ms_per_upload": cpu_ms("floor", "server_cpu"),
        "client_cpu_ms_per_upload": cpu_ms("coordinator", "client_cpu"),
        "raw_client_cpu_ms_per_upload": cpu_ms("raw", "client_cpu"),
        "cpu_cores_busy": cores("coordinator"),
        "raw_cpu_cores_busy": cores("raw"),
        "server_idle_rss_MB": round(idle_kib / 1024, 1),
        "server_start_line_rss_MB": round(start_line_kib[0] / 1024, 1),
        "server_peak_rss_MB": round(peak_kib / 1024, 1),
        "server_peak_rss_during_ingest_MB": round(ingest_peak_kib / 1024, 1),
        "trivial_servicer_idle_rss_MB": round(raw_idle_kib / 1024, 1),
        "trivial_servicer_peak_rss_MB": round(raw_peak_kib / 1024, 1),
        "aggregation_s": round(statistics.median(aggregations), 3),
        "int8_rel_l2_error": round(int8_rel_l2, 5),
        "int8_max_abs_error_over_max_abs": round(int8_max_abs / max_abs, 5),
        "server_max_workers": args.max_workers,
        "upload_slots": "server default" if args.upload_slots is None else args.upload_slots,
        "max_connections": "server default" if args.max_connections is None else args.max_connections,
        "malloc_arenas": args.malloc_arenas or "glibc default",
        "slot_requests_per_upload": round(sum(polls.values()) / (args.devices * args.repeat), 2),
        "mean_streams_while_devices_wait": slot_sampler.mean_streaming(),
        "transport": "TLS over loopback, one connection per device, all devices upload at once",
        "measured_at": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpus": os.cpu_count(),
    }
    figures["targets"] = {
        "ingest_over_raw_grpc": f">= {TARGETS['ingest_over_raw_grpc']}",
        "server_rss_over_delta": f"<= {TARGETS['server_rss_over_delta']}",
        "int8_bytes_over_fp32": f"<= {TARGETS['int8_bytes_over_fp32']}",
    }
    figures["meets_targets"] = {
        "ingest_over_raw_grpc": figures["ingest_over_raw_grpc"] >= TARGETS["ingest_over_raw_grpc"],
        "server_rss_over_delta": figures["server_rss_over_delta"] <= TARGETS["server_rss_over_delta"],
        "int8_bytes_over_fp32": figures["int8_bytes_over_fp32"] <= TARGETS["int8_bytes_over_fp32"],
    }
    print(render_table(figures))
    if not args.no_save:
        update_section("sync", figures, args.results)
        print(f"\nmerged into {args.results} under 'sync'")
    return 0


def _scrape(port: int) -> dict[str, float]:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")  # labelled samples keep their labels in the name
            values[name] = float(value)
    return values


def render_table(f: dict) -> str:
    ok = {True: "yes", False: "NO"}
    rows = [
        (
            "devices (concurrent, TLS, loopback)",
            f"{f['devices']}",
            f"{f['chunk_bytes'] // 1024} KiB chunks, {f['repeats']} interleaved repeats",
        ),
        ("delta size (fp32 payload)", f"{f['delta_bytes'] / 1e6:.2f} MB", ""),
        (
            "ingest into the coordinator",
            f"{f['ingest_MBps']:.1f} MB/s",
            f"{f['uploads_per_s']:.1f} uploads/s",
        ),
        (
            "raw gRPC to a trivial servicer",
            f"{f['raw_grpc_MBps']:.1f} MB/s",
            f"{f['raw_grpc_uploads_per_s']:.1f} uploads/s",
        ),
        (
            "ingest / raw gRPC (median of repeats)",
            f"{f['ingest_over_raw_grpc']:.3f}",
            f"target >= 0.7: {ok[f['meets_targets']['ingest_over_raw_grpc']]}",
        ),
        (
            "  hash+store floor / raw gRPC",
            f"{f['hash_store_floor_over_raw_grpc']:.3f}",
            f"SHA-256 + write + fsync + rename only ({f['hash_store_floor_MBps']:.1f} MB/s)",
        ),
        (
            "upload latency p50 / p99",
            f"{f['upload_latency_p50_s']:.2f} s / {f['upload_latency_p99_s']:.2f} s",
            f"raw {f['raw_latency_p50_s']:.2f} s / {f['raw_latency_p99_s']:.2f} s",
        ),
        (
            "server CPU per upload",
            f"{f['server_cpu_ms_per_upload']:.1f} ms",
            f"trivial {f['raw_server_cpu_ms_per_upload']:.1f} ms, "
            f"hash+store {f['floor_server_cpu_ms_per_upload']:.1f} ms",
        ),
        (
            "client CPU per upload (1 thread per device)",
            f"{f['client_cpu_ms_per_upload']:.1f} ms",
            f"raw gRPC run {f['raw_client_cpu_ms_per_upload']:.1f} ms",
        ),
        (
            "CPU cores busy during uploads (server+clients)",
            f"{f['cpu_cores_busy']:.2f}",
            f"raw gRPC run {f['raw_cpu_cores_busy']:.2f} (of {f['cpus']})",
        ),
        (
            "server RSS idle / peak",
            f"{f['server_idle_rss_MB']:.1f} MB / {f['server_peak_rss_MB']:.1f} MB",
            f"peak during ingest {f['server_peak_rss_during_ingest_MB']:.1f} MB",
        ),
        (
            "(peak - idle) / delta",
            f"{f['server_rss_over_delta']:.2f}",
            f"target <= 4: {ok[f['meets_targets']['server_rss_over_delta']]}",
        ),
        (
            "  same, from the RSS at the start line",
            f"{f['server_rss_over_delta_from_start_line']:.2f}",
            f"devices asked for their task, hung up: {f['server_start_line_rss_MB']:.1f} MB",
        ),
        (
            "  trivial servicer (gRPC alone) peak - idle",
            f"{f['trivial_servicer_rss_over_delta']:.2f} x delta",
            f"{f['trivial_servicer_idle_rss_MB']:.1f} -> {f['trivial_servicer_peak_rss_MB']:.1f} MB",
        ),
        (
            "  coordinator's own share",
            f"{f['coordinator_own_rss_over_delta']:.2f} x delta",
            "(peak - idle) minus the trivial servicer's",
        ),
        (
            "upload admission",
            f"{f['upload_slots']} slots",
            f"{f['slot_requests_per_upload']:.2f} AcquireUploadSlot calls per upload, "
            f"{f['mean_streams_while_devices_wait']} streams on average while devices waited",
        ),
        ("aggregation of the round", f"{f['aggregation_s']:.2f} s", f"{f['devices']} uploads, streamed"),
        (
            "int8 bytes / fp32 bytes",
            f"{f['int8_bytes_over_fp32']:.4f}",
            f"target <= 0.27: {ok[f['meets_targets']['int8_bytes_over_fp32']]}",
        ),
        (
            "int8 reconstruction error",
            f"rel. L2 {f['int8_rel_l2_error']:.4f}",
            f"max abs {f['int8_max_abs_error_over_max_abs']:.4f} x max|delta|",
        ),
    ]
    width = max(len(r[0]) for r in rows)
    value_width = max(len(r[1]) for r in rows)
    lines = [
        f"| {'measure':<{width}} | {'value':<{value_width}} | note |",
        f"|{'-' * (width + 2)}|{'-' * (value_width + 2)}|------|",
    ]
    lines += [f"| {name:<{width}} | {value:<{value_width}} | {note} |" for name, value, note in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
