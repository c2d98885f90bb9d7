"""`comigs simulate`: every method of the paper's table on one scenario, in one process."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    from edge_runtime.simulation.methods import METHODS

    methods_help = "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values())
    p = subparsers.add_parser(
        "simulate", help="run the paper's methods on a prepared scenario, N devices in one process",
        description="Trains every requested method on the devices of a prepared scenario with the same local "
                    "trainer and the coordinator's aggregation code, then reports per-device and mean test "
                    f"perplexity (pretrained model as the first row). Methods: {methods_help}. Defaults are the "
                    "paper's schedule (20 rounds x 10 local steps, batch 64 x 128, router every 30 steps).")
    p.add_argument("--data", type=Path, required=True,
                   help="scenario directory: one subdirectory per device with train/valid/test.npy")
    p.add_argument("--out", type=Path, default=Path("runs/simulate"), help="report directory (default: %(default)s)")
    p.add_argument("--model", default="default", help="base model: 'default', a .gguf file or a model directory")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods (default: all)")
    p.add_argument("--experts", default=None, metavar="E1,E2,...",
                   help="experts per device for comigs-1g1s (system heterogeneity), e.g. 1,1,8,8")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--micro-batch-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--router-every", type=int, default=30)
    p.add_argument("--router-steps", type=int, default=10)
    p.add_argument("--strategy", choices=("fedavg", "uniform"), default="fedavg",
                   help="generalist averaging: weighted by training tokens (fedavg) or the paper's plain mean")
    p.add_argument("--eval-every", type=int, default=0, help="per-round test curve every N rounds (0: off)")
    p.add_argument("--eval-tokens", type=int, default=None, help="test tokens per device for the per-round curve")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from edge_runtime.data.tokens import DataError
    from edge_runtime.model.config import ConfigError
    from edge_runtime.model.loading import ModelSourceError, load_base_model
    from edge_runtime.simulation.federation import Federation, SimulationConfig, load_scenario, pretrained_perplexity
    from edge_runtime.simulation.methods import resolve_methods
    from edge_runtime.simulation.report import markdown_table, results_json, write_plots, write_report
    from edge_runtime.training.trainer import TrainerConfig

    try:
        methods = resolve_methods([m.strip() for m in args.methods.split(",") if m.strip()])
        experts = [int(e) for e in args.experts.split(",")] if args.experts else None
        trainer = TrainerConfig(batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
                                seq_len=args.seq_len, lr=args.lr, min_lr=args.lr / 10,
                                router_every=args.router_every, router_steps=args.router_steps)
        config = SimulationConfig(rounds=args.rounds, local_steps=args.local_steps, trainer=trainer,
                                  strategy=args.strategy, eval_every=args.eval_every, eval_tokens=args.eval_tokens,
                                  seed=args.seed)
        devices = load_scenario(args.data)
        base, _ = load_base_model(args.model, with_tokenizer=False)
        for d in devices:
            for split in (d.train, d.valid, d.test):
                split.check_vocab(base.config.vocab_size)
    except (ConfigError, DataError, ModelSourceError, ValueError) as exc:
        print(f"comigs: error: {exc}", file=sys.stderr)
        return 2
    names = [d.name for d in devices]
    print(f"scenario {args.data}: {len(devices)} devices ({', '.join(names)})", flush=True)
    pretrained = pretrained_perplexity(base, devices, args.seq_len)
    results = []
    for method in methods:
        torch_seed(args.seed)
        federation = Federation(base, method, devices, config, experts if method.heterogeneous else None)
        with tqdm(total=args.rounds, desc=method.name, unit="round", dynamic_ncols=True) as bar:
            results.append(federation.run(on_round=lambda _: bar.update(1)))
        print(f"  {method.name}: mean test perplexity {results[-1].mean:.3f}", flush=True)
    cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
    payload = results_json(str(args.data), names, pretrained, results, cfg)
    table = markdown_table(names, pretrained, results)
    write_report(args.out, payload, table)
    plots = write_plots(args.out, results)
    print()
    print(table)
    print(f"report: {args.out / 'results.md'}, {args.out / 'results.json'}"
          + (f", {len(plots)} plots" if plots else ""))
    return 0


def torch_seed(seed: int) -> None:
    """Same expert initialisation for every method, so rows differ only by method."""
    import torch

    torch.manual_seed(seed)
