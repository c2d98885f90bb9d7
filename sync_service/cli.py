"""`comigs sync ...`: run and operate the coordinator.

Registered into the single `comigs` command by `edge_runtime.cli`, and also runnable without it as
`python -m sync_service ...` (what the crash tests and the benchmark start). This module imports only
the standard library at import time; each command imports what it needs when it runs, so `comigs --help`
stays instant and nothing here can pull in torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from sync_service.allocator import DEFAULT_ARENAS, limit_malloc_arenas

STATE_DIR_ENV = "COMIGS_SYNC_STATE_DIR"
DEFAULT_STATE_DIR = "sync-state"


def _state_dir_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir",
        default=os.environ.get(STATE_DIR_ENV, DEFAULT_STATE_DIR),
        help=f"coordinator state directory (SQLite database + tensor files); default ${STATE_DIR_ENV} "
        f"or ./{DEFAULT_STATE_DIR}",
    )


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _add_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    fmt = argparse.ArgumentDefaultsHelpFormatter

    init = subparsers.add_parser(
        "init",
        help="create a state directory from the initial generalist",
        description="Create a coordinator state directory whose generalist version 0 is FILE. Every device "
        "downloads this exact generalist, so all start from the same weights. The tensors in FILE (any "
        "float dtype; stored as float32) define the manifest every upload is checked against.",
        formatter_class=fmt,
    )
    _state_dir_arg(init)
    init.add_argument(
        "--generalist",
        required=True,
        metavar="FILE.safetensors",
        help="initial generalist tensors (the shared LoRA experts at their initial values)",
    )
    init.set_defaults(func=_cmd_init)

    serve = subparsers.add_parser(
        "serve",
        help="run the coordinator (gRPC + metrics) until SIGTERM/SIGINT",
        description="Serve the sync protocol: devices register, ask for tasks, download the generalist, "
        "upload deltas; rounds open, close at their deadline with a quorum (or get extended, or fail) and "
        "publish the averaged generalist. TLS is required unless --insecure on a loopback address. Round "
        "settings apply to rounds opened from now on; a round already open keeps the settings it began with.",
        formatter_class=fmt,
    )
    _state_dir_arg(serve)
    serve.add_argument(
        "--initial-generalist",
        metavar="FILE.safetensors",
        help="initialise the state directory from FILE first, if it is not initialised yet",
    )
    serve.add_argument("--listen", default="0.0.0.0:50051", help="HOST:PORT for gRPC (port 0: any free port)")
    serve.add_argument("--tls-cert", help="PEM certificate chain for TLS")
    serve.add_argument("--tls-key", help="PEM private key for TLS")
    serve.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext gRPC; only allowed when --listen is a loopback address",
    )
    serve.add_argument(
        "--metrics-listen",
        default="127.0.0.1:9464",
        help="HOST:PORT of the Prometheus /metrics endpoint ('' disables it)",
    )
    rounds = serve.add_argument_group("rounds")
    rounds.add_argument(
        "--min-devices", type=int, default=2, help="quorum: uploads needed to aggregate a round"
    )
    rounds.add_argument(
        "--round-timeout", type=_positive_float, default=600.0, help="seconds a round accepts uploads"
    )
    rounds.add_argument(
        "--extension",
        type=_positive_float,
        default=None,
        help="seconds added when the deadline passes without quorum (default: --round-timeout)",
    )
    rounds.add_argument(
        "--max-extensions",
        type=_non_negative_int,
        default=2,
        help="extensions before a round without quorum fails",
    )
    rounds.add_argument(
        "--rounds",
        type=_non_negative_int,
        default=20,
        help="rounds to publish before telling devices training is done (0: no limit)",
    )
    rounds.add_argument(
        "--strategy",
        choices=("fedavg", "uniform"),
        default="fedavg",
        help="fedavg: weighted by sample count; uniform: the CoMiGS paper's plain mean",
    )
    rounds.add_argument(
        "--clip-norm",
        type=_positive_float,
        default=None,
        help="scale each delta down to at most this L2 norm before averaging",
    )
    rounds.add_argument(
        "--no-early-close",
        action="store_true",
        help="always wait for the deadline, even when every enrolled device has uploaded",
    )
    rounds.add_argument("--encodings", default="fp32,fp16,int8", help="accepted upload encodings")
    rounds.add_argument(
        "--poll-interval",
        type=_positive_float,
        default=5.0,
        help="seconds devices are told to wait before asking again",
    )
    local = serve.add_argument_group("local training config sent to devices (0: device default)")
    local.add_argument("--local-steps", type=_non_negative_int, default=10)
    local.add_argument("--router-every", type=_non_negative_int, default=0)
    local.add_argument("--router-steps", type=_non_negative_int, default=0)
    local.add_argument("--expert-lr", type=float, default=0.0)
    local.add_argument("--router-lr", type=float, default=0.0)
    local.add_argument("--batch-size", type=_non_negative_int, default=0)
    local.add_argument(
        "--local-extra",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra key=value passed to devices (repeatable)",
    )
    ops = serve.add_argument_group("operations")
    ops.add_argument("--max-workers", type=int, default=16, help="gRPC handler threads (concurrent RPCs)")
    ops.add_argument(
        "--upload-slots",
        type=_non_negative_int,
        default=None,
        help="upload streams received at once; other devices queue for a slot, first come first served; "
        "0: no admission control (default: %(default)s, i.e. max-workers - 4)",
    )
    ops.add_argument(
        "--malloc-arenas",
        type=_non_negative_int,
        default=DEFAULT_ARENAS,
        help="cap on glibc's malloc arenas for this process: fewer arenas hold less freed memory (lower "
        "peak RSS under many concurrent uploads) at some risk of lock contention; measurements in "
        "sync_service/allocator.py. 0: the C library's default (default: %(default)s)",
    )
    ops.add_argument(
        "--idle-connection-timeout",
        type=_positive_float,
        default=120.0,
        help="seconds without any call after which a device's connection is closed (it reconnects on "
        "its next call)",
    )
    ops.add_argument(
        "--max-connections",
        type=_non_negative_int,
        default=None,
        help="TCP connections held at once; more are closed as they arrive (before TLS) and devices retry "
        "after their backoff. Bounds the memory a burst of devices costs (~65-200 KiB per TLS connection); "
        "must exceed the upload slots. 0: no limit (default: 64, or 4 x the upload slots if more)",
    )
    ops.add_argument(
        "--keep-uploads",
        action="store_true",
        help="keep upload files after their round finishes (default: delete, keep the records)",
    )
    ops.add_argument("--log-format", choices=("json", "text"), default="json", help="structured log format")
    ops.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    ops.add_argument("--ready-file", help="write {pid, port, metrics_port} as JSON here once serving")
    ops.add_argument(
        "--tick-interval", type=_positive_float, default=0.2, help="seconds between round-deadline checks"
    )
    serve.set_defaults(func=_cmd_serve)

    add = subparsers.add_parser(
        "add-device",
        help="enrol a device and print its bearer token (once)",
        description="Enrol device NAME and print its bearer token on stdout. Only a salted hash is stored: "
        "the token cannot be shown again. With --rotate, an existing device gets a new token (the old one "
        "stops working at once) and is reinstated if it was revoked. Works while the server runs.",
        formatter_class=fmt,
    )
    _state_dir_arg(add)
    add.add_argument("name", metavar="NAME", help="device name: 1-64 of A-Z a-z 0-9 . _ -")
    add.add_argument("--rotate", action="store_true", help="replace the token of an existing device")
    add.set_defaults(func=_cmd_add_device)

    revoke = subparsers.add_parser(
        "revoke-device",
        help="revoke a device's token",
        description="Revoke device NAME: its token gets PERMISSION_DENIED from the next call on (the server "
        "checks the database on every call). Uploads it already made keep counting. Undo with "
        "`add-device NAME --rotate`.",
        formatter_class=fmt,
    )
    _state_dir_arg(revoke)
    revoke.add_argument("name", metavar="NAME")
    revoke.set_defaults(func=_cmd_revoke_device)

    status = subparsers.add_parser(
        "status",
        help="show rounds, devices and uploads",
        description="Show the coordinator's state: generalist version, recent rounds (state, uploads vs "
        "quorum, "
        "deadline, failure reasons), devices (capabilities, last metrics report) and the current round's "
        "uploads. Safe to run beside a live server.",
        formatter_class=fmt,
    )
    _state_dir_arg(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--rounds", type=int, default=10, help="how many recent rounds to list")
    status.set_defaults(func=_cmd_status)

    export = subparsers.add_parser(
        "export-generalist",
        help="write a published generalist to a safetensors file",
        description="Copy generalist VERSION (default: the latest) to OUT as a float32 safetensors file.",
        formatter_class=fmt,
    )
    _state_dir_arg(export)
    export.add_argument("out", metavar="OUT.safetensors")
    export.add_argument(
        "--version", type=int, default=None, metavar="VERSION",
        help="generalist version (0: the initial one; `comigs sync status` lists them); None: the latest",
    )
    export.set_defaults(func=_cmd_export)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `sync` command group to the `comigs` command line."""
    parser = subparsers.add_parser(
        "sync",
        help="run or operate the coordinator that averages generalist deltas",
        description="The CoMiGS sync coordinator: a gRPC service that runs collaboration rounds, "
        "authenticates devices, validates and averages their generalist deltas, and stores everything "
        "durably. Start with `init`, `add-device`, then `serve`; watch with `status`.",
    )
    commands = parser.add_subparsers(dest="sync_command", metavar="COMMAND")
    _add_commands(commands)
    parser.set_defaults(func=lambda args: _print_help(parser))


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def _cmd_init(args: argparse.Namespace) -> int:
    from sync_service.store import Store, StoreError

    try:
        with Store.initialise(args.state_dir, args.generalist) as store:
            print(
                f"initialised {store.root}: {len(store.manifest)} tensors, {store.manifest.nbytes / 1e6:.2f} "
                f"MB per fp32 delta; generalist version 0 sha256 {store.latest_generalist().sha256}"
            )
    except StoreError as exc:
        return _fail(str(exc))
    except ValueError as exc:  # invalid tensor names in the file
        return _fail(f"cannot use {args.generalist} as the initial generalist: {exc}")
    return 0


def _local_extra(items: list[str]) -> dict[str, str]:
    extra = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--local-extra expects KEY=VALUE, got {item!r}")
        extra[key] = value
    return extra


def _cmd_serve(args: argparse.Namespace) -> int:
    limit_malloc_arenas(args.malloc_arenas)  # before numpy's and gRPC's threads exist
    import gc
    import signal
    import threading
    from pathlib import Path

    from sync_service.config import LocalTrainingConfig, RoundConfig, ServerConfig
    from sync_service.logs import configure_logging
    from sync_service.server import SyncServer
    from sync_service.store import Store, StoreError

    configure_logging(args.log_format, args.log_level)
    try:
        if args.initial_generalist and not Store.is_initialised(args.state_dir):
            Store.initialise(args.state_dir, args.initial_generalist).close()
        local = LocalTrainingConfig(
            local_steps=args.local_steps,
            router_every=args.router_every,
            router_steps=args.router_steps,
            expert_lr=args.expert_lr,
            router_lr=args.router_lr,
            batch_size=args.batch_size,
            extra=_local_extra(args.local_extra),
        )
        rounds = RoundConfig(
            min_devices=args.min_devices,
            round_timeout_s=args.round_timeout,
            extension_s=args.extension,
            max_extensions=args.max_extensions,
            rounds=args.rounds,
            strategy=args.strategy,
            clip_norm=args.clip_norm,
            early_close=not args.no_early_close,
            encodings=tuple(e.strip() for e in args.encodings.split(",") if e.strip()),
            poll_interval_s=args.poll_interval,
            local=local,
        )
        config = ServerConfig(
            state_dir=Path(args.state_dir),
            listen=args.listen,
            tls_cert=Path(args.tls_cert) if args.tls_cert else None,
            tls_key=Path(args.tls_key) if args.tls_key else None,
            insecure=args.insecure,
            metrics_listen=args.metrics_listen or None,
            max_workers=args.max_workers,
            upload_slots=args.upload_slots,
            idle_connection_s=args.idle_connection_timeout,
            max_connections=args.max_connections,
            keep_uploads=args.keep_uploads,
            ready_file=Path(args.ready_file) if args.ready_file else None,
            tick_interval_s=args.tick_interval,
            rounds=rounds,
        )
        server = SyncServer(config)
    except (ValueError, StoreError, OSError) as exc:
        return _fail(str(exc))
    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        server.start()
    except (ValueError, OSError) as exc:
        server.stop(0)
        return _fail(str(exc))
    # Uploads allocate many short-lived objects (headers, protobuf messages); with the default thresholds
    # the cyclic GC ran often and re-scanned every long-lived object (measured: ~10 % of the GIL time
    # under 200 concurrent uploads). Freeze what start-up created and collect less eagerly.
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    while not stop.wait(3600):
        pass
    server.stop()
    return 0


def _cmd_add_device(args: argparse.Namespace) -> int:
    from sync_service.auth import add_device
    from sync_service.store import Store, StoreError

    try:
        with Store(args.state_dir) as store:
            token = add_device(store, args.name, rotate=args.rotate)
    except (StoreError, ValueError) as exc:
        return _fail(str(exc))
    print(token)
    print(
        f"{'rotated the token of' if args.rotate else 'enrolled'} device {args.name!r}. The token above is "
        "shown only once: give it to the device (SyncClient token=...).",
        file=sys.stderr,
    )
    return 0


def _cmd_revoke_device(args: argparse.Namespace) -> int:
    from sync_service.store import Store, StoreError

    try:
        with Store(args.state_dir) as store:
            changed = store.revoke_device(args.name)
    except StoreError as exc:
        return _fail(str(exc))
    print(f"device {args.name!r} {'revoked' if changed else 'was already revoked'}")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    import json

    from sync_service.report import build_status, render_status
    from sync_service.store import Store, StoreError

    try:
        with Store(args.state_dir) as store:
            status = build_status(store, args.rounds)
    except StoreError as exc:
        return _fail(str(exc))
    print(json.dumps(status, indent=2) if args.json else render_status(status))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import shutil

    from sync_service.store import Store, StoreError

    try:
        with Store(args.state_dir) as store:
            row = store.latest_generalist() if args.version is None else store.get_generalist(args.version)
            if row is None:
                return _fail(f"generalist version {args.version} does not exist")
            shutil.copyfile(store.root / row.path, args.out)
    except StoreError as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"cannot write {args.out}: {exc.strerror or exc}")
    print(f"wrote generalist version {row.version} to {args.out} (sha256 {row.sha256})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m sync_service COMMAND ...` (the same commands as `comigs sync COMMAND ...`)."""
    parser = argparse.ArgumentParser(
        prog="python -m sync_service",
        description="The CoMiGS sync coordinator (same commands as `comigs sync`).",
    )
    _add_commands(parser.add_subparsers(dest="sync_command", metavar="COMMAND"))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
