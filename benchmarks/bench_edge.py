"""Training SmolLM2 1G1S on a device within a memory budget: plan, measured peak RSS, tokens/s.

For each budget (default 768, 1024, 1536, 2048 MB) a fresh process does what a device agent
does before and during local training:

1. decide the dtype of the frozen base weights before loading anything
   (`budget.choose_base_dtype`: fp32 if it fits with headroom, else bf16);
2. load SmolLM2-135M with 1 generalist + 1 specialist (rank 8) and let `budget.plan_memory`
   pick micro-batch, gradient accumulation, chunked LM-head loss and layer checkpointing;
3. run expert steps of the local trainer (batch --batch x 128, with one router phase) and time
   them.

The peak RSS reported is the kernel's high-water mark of the *whole process* (VmHWM: imports,
loading, the planner's probe steps and training), i.e. what an OOM killer or a phone's memory
limit sees, not only the training steps. A budget the planner refuses is reported with its
message. The base model comes from a bf16 directory converted once from the GGUF with
`comigs model convert` (loading a GGUF dequantises to fp32 first, which no 1 GB device can
afford); every budget loads those same weights (fp32 budgets upcast them), so the runs differ
only in memory plan. Tokens are random ids (speed and memory do not depend on the text).

    python benchmarks/bench_edge.py                      # writes results.json "edge"
    python benchmarks/bench_edge.py --budgets 900,1024 --no-write

Targets (issue 5): peak RSS <= budget for every budget; SmolLM2 1G1S training fits in 1024 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import update_section  # noqa: E402

DEFAULT_BUDGETS = (768, 1024, 1536, 2048)


def worker(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from edge_runtime.budget import BudgetError, choose_base_dtype, plan_memory
    from edge_runtime.data.tokens import TokenSplit
    from edge_runtime.memory import peak_rss_bytes
    from edge_runtime.model.config import CoMiGSConfig
    from edge_runtime.model.factory import build_comigs_model
    from edge_runtime.model.loading import count_base_parameters, is_gguf_source
    from edge_runtime.training.trainer import LocalTrainer, TrainerConfig

    budget = args.worker
    result: dict = {"budget_mb": budget}
    try:
        dtype = choose_base_dtype(budget, count_base_parameters(args.model), is_gguf_source(args.model))
        model, _ = build_comigs_model(args.model, CoMiGSConfig(n_generalists=1, n_specialists=1),
                                      with_tokenizer=False, dtype=dtype)
        plan = plan_memory(model, budget, args.batch, args.seq_len)
    except BudgetError as exc:
        return result | {"refused": str(exc), "peak_rss_mb": peak_rss_bytes() / 2**20}
    option = plan.option
    config = TrainerConfig(batch_size=args.batch, micro_batch_size=option.micro_batch_size, seq_len=args.seq_len,
                           activation_checkpointing=option.activation_checkpointing,
                           loss_chunk_tokens=option.loss_chunk_tokens, release_memory=True,
                           router_every=args.steps, router_steps=1, total_steps=1000)
    vocab = model.config.vocab_size
    rng = np.random.default_rng(0)
    trainer = LocalTrainer(model, config, TokenSplit(rng.integers(0, vocab, 100_000)),
                           TokenSplit(rng.integers(0, vocab, 20_000)))
    trainer.expert_step()  # warm-up (first-touch allocations); counted in the peak like everything else
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        trainer.expert_step()
        times.append(time.perf_counter() - start)
    trainer.router_phase()
    step_s = sorted(times)[len(times) // 2]
    return result | {
        "base_dtype": str(dtype).removeprefix("torch."),
        "plan": plan.option.describe(), "accumulation": plan.accumulation,
        "estimated_peak_mb": plan.peak_bytes / 2**20,
        "peak_rss_mb": peak_rss_bytes() / 2**20,
        "step_s": step_s, "tokens_per_s": args.batch * args.seq_len / step_s,
        "threads": torch.get_num_threads(),
    }


def convert_model(directory: Path) -> None:
    subprocess.run([sys.executable, "-m", "edge_runtime.cli", "model", "convert", "--model", "default",
                    "--dtype", "bf16", "--out", str(directory)], check=True, stdout=subprocess.DEVNULL)


def run_budget(args: argparse.Namespace, model: str, budget: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(budget), "--model", model, "--batch", str(args.batch),
           "--seq-len", str(args.seq_len), "--steps", str(args.steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        # Killed (e.g. by the OOM killer) or crashed: report it, never hide it.
        return {"budget_mb": budget, "error": f"worker exited {proc.returncode}: {proc.stderr.strip()[-2000:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(rows: list[dict], args: argparse.Namespace, model: str) -> dict:
    ran = [r for r in rows if "tokens_per_s" in r]
    figures: dict = {
        "model": "SmolLM2-135M 1G1S rank 8", "model_source": model, "batch": f"{args.batch}x{args.seq_len}",
        "max_rss_over_budget": max((r["peak_rss_mb"] / r["budget_mb"] for r in ran), default=None),
        "min_budget_mb": min((r["budget_mb"] for r in ran), default=None),
        "fits_1024_mb": any(r["budget_mb"] <= 1024 and r["peak_rss_mb"] <= r["budget_mb"] for r in ran),
        "budgets": {str(r["budget_mb"]): r for r in rows},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    for r in ran:
        figures[f"tokens_per_s_{r['budget_mb']}"] = r["tokens_per_s"]
    return figures


def print_table(figures: dict) -> None:
    print("| budget MB | base | plan | estimated peak MB | measured peak MB | peak / budget | tokens/s |")
    print("|---|---|---|---|---|---|---|")
    for key, r in figures["budgets"].items():
        if "tokens_per_s" in r:
            print(f"| {key} | {r['base_dtype']} | {r['plan']}, accumulation {r['accumulation']} | "
                  f"{r['estimated_peak_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / r['budget_mb']:.2f} | "
                  f"{r['tokens_per_s']:.0f} |")
        else:
            why = r.get("refused") or r.get("error", "")
            print(f"| {key} | - | refused: {why} | - | {r.get('peak_rss_mb', 0):.0f} | - | - |")
    print()
    for key in ("max_rss_over_budget", "min_budget_mb", "fits_1024_mb"):
        print(f"{key}: {figures[key]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default=",".join(map(str, DEFAULT_BUDGETS)), help="MB, comma-separated")
    parser.add_argument("--model", default=None,
                        help="base model (default: SmolLM2 converted to bf16 safetensors in a temporary directory)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per expert step (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="timed expert steps per budget (median reported)")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="do not update benchmarks/results.json")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    budgets = [int(b) for b in args.budgets.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-edge-") as tmp:
        model = args.model
        if model is None:
            model = str(Path(tmp) / "smollm2-bf16")
            print("converting SmolLM2 to bf16 safetensors ...", flush=True)
            convert_model(Path(model))
        rows = []
        for budget in budgets:
            print(f"budget {budget} MB ...", flush=True)
            rows.append(run_budget(args, model, budget))
            print(f"  {json.dumps(rows[-1])[:400]}", flush=True)
    figures = summarise(rows, args, "smollm2 (bf16 safetensors via comigs model convert)"
                        if args.model is None else args.model)
    print()
    print_table(figures)
    if not args.no_write:
        update_section("edge", figures)


if __name__ == "__main__":
    main()
