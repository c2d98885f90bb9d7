"""What N connected devices cost a gRPC server's memory: TLS vs plaintext, gRPC options, malloc settings.

The benchmark's trivial SyncService servicer (`bench_sync.serve_raw`: GetTask answers, UploadDelta
only reads) in its own process, with the coordinator's gRPC options plus any given with --option.
N channels connect (one GetTask each), then --uploads deltas of --delta-mb are streamed one after
another over those connections. Prints the server's RSS above idle after connecting and after the
uploads, and its peak, in MB and in deltas.
This is how the per-connection figures in sync_service/README.md were measured, e.g.

    python benchmarks/probe_sync_memory.py --devices 200 --uploads 200
    python benchmarks/probe_sync_memory.py --devices 200 --uploads 200 --plaintext
    MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=131072 python benchmarks/probe_sync_memory.py ...

(glibc reads MALLOC_* in the server process, which inherits this environment.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/probe_sync_memory.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--devices", type=int, default=200, help="connected channels")
    parser.add_argument("--uploads", type=int, default=0, help="uploads streamed one after another")
    parser.add_argument("--delta-mb", type=float, default=6.08, help="payload size of one upload")
    parser.add_argument("--plaintext", action="store_true", help="no TLS (to isolate TLS's share)")
    parser.add_argument(
        "--option", action="append", default=[], metavar="KEY=INT", help="extra gRPC server option"
    )
    parser.add_argument("--serve", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        from bench_sync import serve_raw

        cert, key, ready, options_json = args.serve
        options = [tuple(option) for option in json.loads(options_json)]
        serve_raw(cert, key, ready, 16, plaintext=args.plaintext, extra_options=options)
        return 0

    import grpc
    from bench_sync import make_cert, rss_kib

    from sync_service.proto import sync_pb2 as pb
    from sync_service.proto import sync_pb2_grpc as pb_grpc

    options = [[k, int(v)] for k, _, v in (o.partition("=") for o in args.option)]
    with tempfile.TemporaryDirectory(prefix="probe-sync-") as tmp_name:
        tmp = Path(tmp_name)
        cert, key, pem = make_cert(tmp)
        ready = tmp / "ready"
        command = [sys.executable, __file__, "--serve", str(cert), str(key), str(ready), json.dumps(options)]
        server = subprocess.Popen(command + (["--plaintext"] if args.plaintext else []))
        try:
            while not (ready.exists() and ready.read_text()):
                if server.poll() is not None:
                    raise RuntimeError("server exited")
                time.sleep(0.05)
            target = f"127.0.0.1:{json.loads(ready.read_text())['port']}"
            time.sleep(0.5)
            idle = rss_kib(server.pid, "VmRSS") / 1024
            stubs = []
            for _ in range(args.devices):
                if args.plaintext:
                    channel = grpc.insecure_channel(target)
                else:
                    channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(pem))
                stub = pb_grpc.SyncServiceStub(channel)
                stub.GetTask(pb.GetTaskRequest(), timeout=30)
                stubs.append(stub)
            time.sleep(0.5)
            connected = rss_kib(server.pid, "VmRSS") / 1024
            payload = os.urandom(int(args.delta_mb * 1e6))

            def messages():  # type: ignore[no-untyped-def]
                yield pb.UploadDeltaRequest(header=pb.UploadHeader())
                for seq, offset in enumerate(range(0, len(payload), 65536)):
                    data = payload[offset : offset + 65536]
                    yield pb.UploadDeltaRequest(chunk=pb.Chunk(seq=seq, offset=offset, data=data))

            for i in range(args.uploads):
                stubs[i % len(stubs)].UploadDelta(messages(), timeout=60)
            time.sleep(0.3)
            after, peak = rss_kib(server.pid, "VmRSS") / 1024, rss_kib(server.pid, "VmHWM") / 1024
        finally:
            server.kill()
            server.wait()
    delta = args.delta_mb
    tls = "plaintext" if args.plaintext else "TLS"
    print(
        f"{args.devices} {tls} devices: idle {idle:.1f} MB; connected +{connected - idle:.1f} MB "
        f"({(connected - idle) * 1024 / max(args.devices, 1):.0f} KiB each); after {args.uploads} uploads "
        f"+{after - idle:.1f} MB; peak +{peak - idle:.1f} MB = {(peak - idle) / delta:.2f} deltas"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
