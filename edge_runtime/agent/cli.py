"""`comigs edge run` / `comigs edge plan` (and `comigs edge demo`): the device agent's command line.

Imports only the standard library at import time, so `comigs --help` stays instant; each command
imports torch (or ExecuTorch) when it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

TOKEN_ENV = "COMIGS_DEVICE_TOKEN"

RUN_EPILOG = """\
exit codes: 0 done (the coordinator said DONE, or --max-rounds reached); 1 other error; 2 bad input
(arguments, data, model, artifacts, budget); 3 coordinator unreachable after the retries; 4 token
refused (revoked or wrong); 5 state directory corrupt, locked or set up for another device.

The state directory holds everything the device must not lose (specialists, routers, optimizer state,
step counters, data cursor, the current round and any delta waiting to be uploaded); every change is
committed atomically, so after a crash or power loss the same command resumes where it stopped,
without redoing completed steps or uploading a delta twice. Only generalist deltas leave the device;
the last --keep-sent payloads are kept under STATE_DIR/sent/ for inspection.
"""


def _add_device_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True,
                        help="this device's token splits: a directory with train.npy and valid.npy "
                             "(from `comigs data prepare`)")
    parser.add_argument("--experts", default="1,1", metavar="G,S",
                        help="generalist and specialist experts per MLP (default: %(default)s)")
    parser.add_argument("--rank", type=int, default=8,
                        help="LoRA rank; must match the coordinator (default: %(default)s)")
    parser.add_argument("--backend", choices=("eager", "executorch"), default="eager",
                        help="eager: PyTorch (Pi, Jetson); executorch: the exported training program of --artifacts "
                             "(what a phone runs) (default: %(default)s)")
    parser.add_argument("--artifacts", type=Path,
                        help="`comigs export` directory with a pte-train artifact (needed by --backend executorch)")
    parser.add_argument("--model", default="default",
                        help="base model for the eager backend: 'default' (SmolLM2-135M), a .gguf file or a Hugging "
                             "Face directory (default: %(default)s)")
    parser.add_argument("--budget-mb", type=float, default=None, metavar="N",
                        help="memory budget in MB: picks micro-batch, gradient accumulation, chunked loss and "
                             "checkpointing so the measured peak RSS fits (default: no budget)")
    parser.add_argument("--base-dtype", choices=("auto", "fp32", "bf16"), default="auto",
                        help="dtype of the frozen base weights (eager); bf16 halves them. auto: fp32 unless "
                             "--budget-mb cannot hold it (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="sequences per step when the coordinator does not set it (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=128,
                        help="tokens per sequence (eager; the executorch program fixes its own) (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the specialists/routers init and of the data sampling (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `edge` command group to the `comigs` command line."""
    edge = subparsers.add_parser(
        "edge", help="the device agent: join a coordinator's rounds and train within a memory budget",
        description="The CoMiGS device agent. `run` joins a coordinator, trains the local experts and router "
                    "bi-level on this device's data within a memory budget and uploads only generalist deltas; "
                    "`plan` shows how it would train within a budget; `demo` runs a coordinator and four agents "
                    "on this machine.")
    commands = edge.add_subparsers(dest="edge_command", metavar="COMMAND")
    edge.set_defaults(func=lambda args: (edge.print_help(), 2)[1])

    run = commands.add_parser(
        "run", help="run the device agent until the coordinator says DONE",
        description="Register with the coordinator, then loop: ask for work, download the current generalist, "
                    "run the local bi-level steps (experts on train.npy, router on valid.npy) with the memory plan, "
                    "upload the generalist delta with the sample count, report metrics (losses, perplexity, step "
                    "time, measured peak RSS), wait for the next round. Specialists and routers never leave "
                    "the device.",
        epilog=RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    conn = run.add_argument_group("coordinator")
    conn.add_argument("--coordinator", required=True, metavar="HOST:PORT", help="address of `comigs sync serve`")
    conn.add_argument("--token", help=f"this device's bearer token (from `comigs sync add-device`); or ${TOKEN_ENV}")
    conn.add_argument("--token-file", type=Path, help="read the token from this file instead")
    conn.add_argument("--ca-file", type=Path, help="PEM certificate(s) to trust for the coordinator's TLS")
    conn.add_argument("--server-name", help="name to check in the coordinator's certificate")
    conn.add_argument("--insecure", action="store_true",
                      help="plaintext gRPC; refused unless the coordinator is on loopback")
    conn.add_argument("--device-id", help="device name (default: the one the token belongs to)")
    conn.add_argument("--retries", type=int, default=6,
                      help="attempts per call on transient errors, with exponential backoff (default: %(default)s)")
    conn.add_argument("--retry-backoff", type=float, default=0.5,
                      help="first backoff in seconds, doubling each retry (default: %(default)s)")
    _add_device_args(run)
    run.add_argument("--state-dir", type=Path, required=True,
                     help="durable device state (created if missing; reuse it to resume)")
    run.add_argument("--max-rounds", type=int, default=None, help="stop after completing this many rounds")
    train = run.add_argument_group("training defaults (the coordinator's round config overrides them)")
    train.add_argument("--local-steps", type=int, default=10, help="expert steps per round (default: %(default)s)")
    train.add_argument("--router-every", type=int, default=30,
                       help="expert steps between router phases (default: %(default)s)")
    train.add_argument("--router-steps", type=int, default=10,
                       help="router steps per phase on valid.npy (default: %(default)s)")
    train.add_argument("--lr", type=float, default=2e-3, help="expert learning rate (default: %(default)s)")
    train.add_argument("--router-lr", type=float, default=2e-3, help="router learning rate (default: %(default)s)")
    train.add_argument("--total-steps", type=int, default=None,
                       help="span of the cosine LR schedule (default: local steps x (--max-rounds or 20))")
    ops = run.add_argument_group("operation")
    ops.add_argument("--encoding", choices=("fp32", "fp16", "int8"), default="fp32",
                     help="upload encoding of the delta (default: %(default)s)")
    ops.add_argument("--eval-batches", type=int, default=4,
                     help="validation batches for the reported validation loss (default: %(default)s)")
    ops.add_argument("--save-every", type=int, default=1,
                     help="commit the state every N local steps (default: %(default)s: no step is ever redone)")
    ops.add_argument("--keep-sent", type=int, default=3,
                     help="keep copies of the last N uploaded payloads in STATE_DIR/sent (default: %(default)s)")
    ops.add_argument("--quiet", action="store_true", help="print errors only")
    run.set_defaults(func=cmd_run)

    plan = commands.add_parser(
        "plan", help="print how training would fit a memory budget, without running",
        description="Load the model (eager) or read the artifacts' manifest (executorch), then print the plan "
                    "`comigs edge run` would use: micro-batch, gradient accumulation, chunked LM-head loss, "
                    "activation checkpointing and the estimated peak memory (for executorch including the "
                    "exported activation arena). An impossible budget is refused with the smallest that works.")
    _add_device_args(plan)
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    plan.set_defaults(func=cmd_plan)

    try:
        from edge_runtime.agent.demo import register_demo
    except ModuleNotFoundError as exc:
        if exc.name != "edge_runtime.agent.demo":
            raise
    else:
        register_demo(commands)


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file:
        try:
            return args.token_file.read_text().strip()
        except OSError as exc:
            print(f"comigs edge: error: cannot read --token-file: {exc.strerror}", file=sys.stderr)
            return None
    token = args.token or os.environ.get(TOKEN_ENV, "")
    if not token:
        print(f"comigs edge: error: give the device token with --token, --token-file or ${TOKEN_ENV} "
              "(`comigs sync add-device NAME` prints it).", file=sys.stderr)
        return None
    return token


def cmd_run(args: argparse.Namespace) -> int:
    from edge_runtime.agent.loop import AgentOptions, run_agent

    token = _token(args)
    if token is None:
        return 2
    options = AgentOptions(
        coordinator=args.coordinator, token=token, data=args.data, state_dir=args.state_dir, experts=args.experts,
        rank=args.rank, backend=args.backend, artifacts=args.artifacts, model=args.model, budget_mb=args.budget_mb,
        base_dtype=args.base_dtype,
        ca_file=args.ca_file, server_name=args.server_name, insecure=args.insecure, device_id=args.device_id,
        max_rounds=args.max_rounds, local_steps=args.local_steps, batch_size=args.batch_size, seq_len=args.seq_len,
        router_every=args.router_every, router_steps=args.router_steps, lr=args.lr, router_lr=args.router_lr,
        total_steps=args.total_steps, seed=args.seed, encoding=args.encoding, eval_batches=args.eval_batches,
        save_every=max(1, args.save_every), keep_sent=args.keep_sent, retries=args.retries,
        retry_backoff_s=args.retry_backoff, threads=args.threads, quiet=args.quiet)
    return run_agent(options)


def cmd_plan(args: argparse.Namespace) -> int:
    from edge_runtime.agent.loop import (
        AgentError,
        build_device_model,
        executorch_manifest,
        load_device_data,
        plan_eager,
        plan_executorch,
    )

    try:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        if args.backend == "executorch":
            manifest = executorch_manifest(args.artifacts, args.experts)
            plan = plan_executorch(manifest, args.budget_mb, args.batch_size)
            load_device_data(args.data, plan.seq_len, int(manifest.data["base_model"]["vocab_size"]))
        else:
            model = build_device_model(args.model, args.experts, args.rank, args.seed, args.base_dtype, args.budget_mb)
            load_device_data(args.data, args.seq_len, int(model.config.vocab_size))
            plan = plan_eager(model, args.budget_mb, args.batch_size, args.seq_len)
    except AgentError as exc:
        print(f"comigs edge: error: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(f"backend {plan.backend}: batch {plan.batch_size} = micro-batch {plan.micro_batch_size} x "
              f"{plan.batch_size // plan.micro_batch_size} accumulation step(s), {plan.seq_len} tokens per sequence")
        print(f"  {plan.description}")
        if plan.arena_bytes is not None:
            print(f"  exported activation arena: {plan.arena_bytes / 2**20:.2f} MiB")
    return 0
