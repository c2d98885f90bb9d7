"""Where an exported prefill spends its time, operator by operator, in ExecuTorch and ONNX Runtime.

Why this exists: `bench_export.py` says how fast a prefill is; deciding what to optimise next needs
to know what it is made of. This runs the benchmark's prefill (1 x T tokens, logits at the last
position, as `next_token_logits` asks) with each runtime's own profiler and groups the events:

* ExecuTorch XNNPACK: an ETDump of `--runs` prefills (the runtime built with event tracing, which
  executorch's wheel is); XNNPACK operators by kind, with the fully connected (GEMM) operators split
  by time into the frozen base model's large ones and the small ones (LoRA factors, routers,
  selection matmuls), plus the portable kernels between delegates;
* ONNX Runtime: its built-in profiler (`enable_profiling`), kernel time by operator type.

Times are per prefill (medians of the runs for ExecuTorch, means for ONNX Runtime). Profiling adds
overhead, ONNX Runtime's more than ExecuTorch's, so compare shares and counts, not the totals with
`bench_export.py`'s.

    python benchmarks/profile_prefill.py --artifacts DIR [--runtime executorch|onnxruntime|both]
                                         [--tokens 128] [--runs 8] [--threads 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

LARGE_GEMM_MS = 0.08  # SmolLM2 at T = 128 on 2 cores: base GEMMs 0.13 (k, v) to 1.6 ms, LoRA factors ~0.02
SKIPPED_EVENTS = {"Program::load_method", "Method::init", "Method::execute", "DELEGATE_CALL", "OPERATOR_CALL"}


def _input_ids(vocab: int, tokens: int) -> Any:
    import torch

    return torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))


def profile_executorch(artifacts: Path, tokens: int, runs: int, threads: int) -> dict[str, Any]:
    import torch
    from executorch.devtools import Inspector

    from edge_runtime.artifacts import Manifest
    from edge_runtime.artifacts.executorch_runtime import runtime, set_threads

    manifest = Manifest.load(artifacts)
    set_threads(threads)
    module = runtime()._load_for_executorch(
        str(manifest.path("pte-xnnpack", "program")), data_path=str(manifest.path("pte-xnnpack", "data")),
        enable_etdump=True, debug_buffer_size=0)
    ids = _input_ids(int(manifest.data["base_model"]["vocab_size"]), tokens)
    positions = torch.tensor([tokens - 1])
    for _ in range(runs):
        module.forward([ids, positions])
    with tempfile.TemporaryDirectory() as tmp:
        etdump = Path(tmp) / "prefill.etdp"
        module.write_etdump_result_to_file(str(etdump))
        frame = Inspector(etdump_path=str(etdump)).to_dataframe()
    execute = frame[frame.event_name == "Method::execute"]["raw"]
    per_run = {"execute_ms": statistics.median(execute.iloc[0]) if len(execute) else None}
    groups: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for name, raw in zip(frame.event_name, frame.raw, strict=True):
        if name in SKIPPED_EVENTS or not len(raw):
            continue
        ms = statistics.median(raw)
        kind = name.rsplit(" #", 1)[0]
        if kind.startswith("Fully Connected"):
            kind += " (base model)" if ms >= LARGE_GEMM_MS else " (small: factors, routers, selections)"
        elif kind.startswith("native_call_"):
            kind = "portable " + kind.removeprefix("native_call_").removesuffix(".out")
        groups[kind][0] += ms
        groups[kind][1] += 1
    return {**per_run, "ops": _table(groups)}


def profile_onnxruntime(artifacts: Path, tokens: int, runs: int, threads: int) -> dict[str, Any]:
    import numpy as np
    import onnxruntime as ort

    from edge_runtime.artifacts import Manifest
    from edge_runtime.artifacts.onnx_inference import session_options

    manifest = Manifest.load(artifacts)
    with tempfile.TemporaryDirectory() as tmp:
        options = session_options(threads)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(manifest.path("onnx", "model")), options,
                                       providers=["CPUExecutionProvider"])
        feeds = {"input_ids": _input_ids(int(manifest.data["base_model"]["vocab_size"]), tokens).numpy(),
                 "logit_positions": np.array([tokens - 1], dtype=np.int64)}
        session.run(None, feeds)  # warm-up, excluded below
        for _ in range(runs):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    model_runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    warm_up_end = model_runs[0]["ts"] + model_runs[0]["dur"]
    groups: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for event in events:
        if not (event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] > warm_up_end):
            continue
        group = groups[event["args"].get("op_name", "?")]
        group[0] += event["dur"] / 1000 / runs
        group[1] += 1 / runs
    return {"execute_ms": statistics.mean(e["dur"] / 1000 for e in model_runs[1:]), "ops": _table(groups)}


def _table(groups: dict[str, list[float]]) -> list[dict[str, Any]]:
    rows = [{"op": k, "ms": round(v[0], 3), "count": round(v[1])} for k, v in groups.items()]
    return sorted(rows, key=lambda r: -r["ms"])


def _print(name: str, result: dict[str, Any], top: int) -> None:
    total = sum(r["ms"] for r in result["ops"])
    print(f"\n{name}: {result['execute_ms']:.1f} ms per prefill (profiled), operators {total:.1f} ms")
    print(f"  {'operator':58s} {'ms':>8s} {'share':>6s} {'count':>6s}")
    for row in result["ops"][:top]:
        print(f"  {row['op'][:58]:58s} {row['ms']:8.2f} {row['ms'] / total:6.1%} {row['count']:6d}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/profile_prefill.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, required=True, help="an export with pte-xnnpack and/or onnx")
    parser.add_argument("--runtime", choices=("executorch", "onnxruntime", "both"), default="both")
    parser.add_argument("--tokens", type=int, default=128, help="prompt length (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=8, help="profiled prefills (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="runtime threads (default: %(default)s)")
    parser.add_argument("--top", type=int, default=20, help="operators to print per runtime")
    parser.add_argument("--json", type=Path, help="also write the tables to this file")
    args = parser.parse_args(argv)
    if args.tokens < 1 or args.runs < 1:
        parser.error("--tokens and --runs must be >= 1")
    if not (args.artifacts / "manifest.json").is_file():
        parser.error(f"{args.artifacts} has no manifest.json: pass an export directory")
    wanted = ("executorch", "onnxruntime") if args.runtime == "both" else (args.runtime,)
    results = {}
    for name in wanted:
        profile = profile_executorch if name == "executorch" else profile_onnxruntime
        results[name] = profile(args.artifacts, args.tokens, args.runs, args.threads)
        _print(name, results[name], args.top)
    if args.json:
        args.json.write_text(json.dumps({"tokens": args.tokens, "runs": args.runs, "threads": args.threads,
                                         **results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
