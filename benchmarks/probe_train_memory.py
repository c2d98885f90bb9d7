"""Where the memory of the ExecuTorch training program goes, on SmolLM2-shaped models of a few layers.

Exporting the real 30-layer SmolLM2 training program takes most of an hour; its memory is the sum of
parts that this probe measures in minutes: a fixed part (runtime, LM head over the 49,152-token
vocabulary) and a part per transformer block. For each layer count it exports a randomly initialised
SmolLM2-shaped 1G1S model (d 576, d_ff 1536, 9 heads, tied 49,152 x 576 embedding) to `pte-train`
at 1 x 128 and, in a fresh process, loads the program with `ExecuTorchTrainer` and runs three
`experts` steps, reporting:

- the activation arena the exporter planned (manifest `memory.arena_bytes`);
- RSS after importing the runtime, after loading the program, and the peak over the steps, split
  into anonymous memory (arena, XNNPACK's packed weights and workspace, Python) and file pages
  (the memory-mapped program);
- with `--peak`, what the memory plan holds at its peak: the sum of the buffers alive there (the
  arena minus the planner's fragmentation), where in the program it is, and those buffers by size
  (a block's expert hidden states are 768 KiB, residual-sized values 288 KiB, the LM head's logit
  chunks 2048 KiB). This is how session 10 found what to recompute (`export/rematerialize.py`).

    python benchmarks/probe_train_memory.py --layers 1,4,8
    python benchmarks/probe_train_memory.py --layers 4 --backend portable
    python benchmarks/probe_train_memory.py --layers 2,4 --peak

Linear fits over the layer counts give the per-block and fixed costs; extrapolate to 30 blocks with
care (it does not replace `bench_export.py` on the real model).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SEQ = 128


def status_mib() -> dict[str, int]:
    wanted = ("VmRSS", "VmHWM", "RssAnon", "RssFile")
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in wanted:
            fields[key] = int(line.split()[1]) // 1024
    return fields


@contextlib.contextmanager
def emitted_programs() -> Iterator[list[Any]]:
    """Collect every ExecuTorch program manager the export emits (their memory plans)."""
    from executorch.exir.program._program import EdgeProgramManager

    original = EdgeProgramManager.to_executorch
    programs: list[Any] = []

    def capture(self: Any, *args: Any, **kwargs: Any) -> Any:
        programs.append(original(self, *args, **kwargs))
        return programs[-1]

    EdgeProgramManager.to_executorch = capture
    try:
        yield programs
    finally:
        EdgeProgramManager.to_executorch = original


def plan_peak(program: Any) -> dict:
    """The arena buffers alive at the memory plan's peak (mem_id 1: the planned activation arena); the
    listing by size leaves out buffers under 1 KiB (counted in the sum)."""
    specs: dict[int, Any] = {}
    for node in program.exported_program().graph_module.graph.nodes:
        spec = node.meta.get("spec")
        for s in spec if isinstance(spec, (list, tuple)) else [spec]:
            if getattr(s, "mem_id", None) == 1 and s.lifetime[0] is not None and s.allocated_memory:
                specs[id(s)] = s
    steps = max(s.lifetime[1] for s in specs.values()) + 2
    delta = [0] * steps
    for s in specs.values():
        delta[s.lifetime[0]] += s.allocated_memory
        delta[s.lifetime[1] + 1] -= s.allocated_memory
    live = list(itertools.accumulate(delta))
    at = max(range(steps), key=live.__getitem__)
    sizes = collections.Counter(s.allocated_memory for s in specs.values()
                                if s.lifetime[0] <= at <= s.lifetime[1] and s.allocated_memory >= 1024)
    return {"live_mib": round(live[at] / 2**20, 1), "step": at, "steps": steps - 1,
            "by_size_kib": [[size // 1024, count] for size, count in sizes.most_common(8)]}


def export(layers: int, backend: str, out: Path) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from edge_runtime.model.config import CoMiGSConfig
    from edge_runtime.model.inject import inject_comigs
    from export.pipeline import ExportOptions, export_artifacts

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         tie_word_embeddings=True)
    model = inject_comigs(LlamaForCausalLM(config), CoMiGSConfig(n_generalists=1, n_specialists=1, rank=8))
    started = time.perf_counter()
    with emitted_programs() as programs:
        manifest = export_artifacts(model, out, ExportOptions(formats=("pte-train",), train_backend=backend,
                                                              train_seq_len=SEQ, verify=False))
    memory = manifest.artifact("pte-train")["memory"]
    return {"arena_mib": round(memory["arena_bytes"] / 2**20, 1),
            "program_mib": round(memory["program_bytes"] / 2**20, 1),
            "export_s": round(time.perf_counter() - started, 1),
            "peak": plan_peak(programs[-1])}


def run(directory: Path) -> dict:
    import torch

    torch.set_num_threads(2)
    from edge_runtime.artifacts import ExecuTorchTrainer

    imported = status_mib()
    trainer = ExecuTorchTrainer(directory)
    loaded = status_mib()
    ids = torch.randint(0, trainer.vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, trainer.vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        trainer.step("experts", ids, targets)
    stepped = status_mib()
    return {"imported": imported, "loaded": loaded, "after_steps": stepped}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="1,4,8", help="comma-separated block counts (default: %(default)s)")
    parser.add_argument("--backend", choices=("xnnpack", "portable"), default="xnnpack")
    parser.add_argument("--peak", action="store_true", help="also list the arena buffers alive at the plan's peak")
    parser.add_argument("--worker", choices=("export", "run"), help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker == "export":
        print(json.dumps(export(int(args.layers), args.backend, args.dir)))
        return 0
    if args.worker == "run":
        print(json.dumps(run(args.dir)))
        return 0

    def worker(kind: str, layers: int, directory: Path) -> dict:
        cmd = [sys.executable, __file__, "--worker", kind, "--layers", str(layers), "--backend", args.backend,
               "--dir", str(directory)]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            raise SystemExit(f"{kind} worker for {layers} layers failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    print(f"{'layers':>6} {'arena MiB':>9} {'program MiB':>11} {'load anon/file':>15} "
          f"{'peak RSS':>8} {'step anon - arena':>17} {'export s':>8}")
    with tempfile.TemporaryDirectory(prefix="probe-train-") as tmp:
        for layers in (int(x) for x in args.layers.split(",")):
            directory = Path(tmp) / f"L{layers}"
            exported = worker("export", layers, directory)
            measured = worker("run", layers, directory)
            loaded, stepped = measured["loaded"], measured["after_steps"]
            extra = stepped["RssAnon"] - loaded["RssAnon"] - exported["arena_mib"]
            print(f"{layers:>6} {exported['arena_mib']:>9.1f} {exported['program_mib']:>11.1f} "
                  f"{loaded['RssAnon']:>7}/{loaded['RssFile']:<7} {stepped['VmHWM']:>8} {extra:>17.0f} "
                  f"{exported['export_s']:>8.0f}", flush=True)
            if args.peak:
                peak = exported["peak"]
                sizes = ", ".join(f"{kib} KiB x {count}" for kib, count in peak["by_size_kib"])
                print(f"{'':>6} plan peak: {peak['live_mib']} MiB alive at step {peak['step']} of {peak['steps']}; "
                      f"by size: {sizes}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
