"""The base model's matmuls alone, in each runtime: a floor under that runtime's prefill time.

Why this exists: the same unchanged inference artifacts measured 2.05x (ExecuTorch XNNPACK) and 1.89x
(ONNX Runtime) over eager on one 2-core VM and 1.07x / 0.99x on another. A prefill of 1 x 128 tokens
is almost all frozen-weight matmuls (34.4 of ~36.3 GFLOP for SmolLM2-135M 1G1S; attention scores and
LoRA experts are the rest), so what a runtime's GEMM kernels reach *on this CPU* decides most of the
answer. Here every frozen linear of one prefill (q, k, v, o, gate, up, down per
block on every token, and the LM head on the last token: a prefill wants the next token's logits
only) is timed in isolation with the benchmark's thread count, in each runtime:

* eager: `torch.nn.functional.linear` (MKL / oneDNN);
* ExecuTorch: one `nn.Linear` lowered with the XNNPACK partitioner (XNNPACK's f32 GEMM);
* ONNX Runtime: one `MatMul` with a constant weight (MLAS, weight pre-packed by ORT).

The sum over a prefill's linears is a floor: a runtime cannot run the prefill faster than its matmuls,
so `eager prefill seconds / floor` bounds the speed-up over eager that the runtime can reach on this
machine, whatever the graph around the matmuls does. Attention matmuls and LoRA experts are left out.
The exported programs do less than this on Llama-family models: their last block computes only the rows
whose logits are asked for (`export/last_block.py`; keys and values still on every token), so their true
floor is about 1/L lower (L blocks); eager, like HF, runs every block on every token.
Approximate, not exact: each isolated call also pays a runtime call and an output copy (25 MB for the
head), so on a noisy machine the figure can exceed what the same matmuls cost inside a program; the
per-runtime ratio of the figures (same shapes, same threads, same run) is the robust reading.

    python benchmarks/gemm_floor.py --artifacts DIR [--runtime eager|executorch_xnnpack|onnxruntime]
                                    [--tokens 128] [--head-tokens 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import time_calls  # noqa: E402

RUNTIMES = ("eager", "executorch_xnnpack", "onnxruntime")
Shape = tuple[int, int]  # (out_features, in_features), like a Linear's weight


#: Leaf modules whose frozen `weight` is a matmul of every token, by how the weight is laid out.
LINEAR_LEAVES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"})
CONV1D_LEAVES = frozenset({"c_attn", "c_proj", "c_fc"})  # GPT-2's Conv1D: weight is [in, out]
TOKEN_EMBEDDINGS = frozenset({"embed_tokens", "wte"})  # also the LM head when the model ties them


def prefill_linears(parameters: Iterable[Mapping[str, Any]]) -> tuple[Counter[Shape], Shape | None]:
    """The frozen linears one forward runs, from the manifest's parameters: how many of each (out, in)
    shape in the blocks, and the LM head's shape apart (a prefill runs it on the last token only).

    The manifest lists each parameter once, so a head tied to the token embedding (SmolLM2, GPT-2)
    has no `lm_head.weight` of its own: the embedding then counts as the head. Position embeddings,
    norms and the CoMiGS experts and routers are not frozen linears and are left out.
    """
    shapes: Counter[Shape] = Counter()
    embedding: Shape | None = None
    head: Shape | None = None
    for p in parameters:
        parts = p["name"].split(".")
        if p["role"] != "frozen" or len(p["shape"]) != 2 or len(parts) < 2 or parts[-1] != "weight":
            continue
        rows, cols = (int(d) for d in p["shape"])
        leaf = parts[-2]
        if leaf == "lm_head":
            head = (rows, cols)
        elif leaf in LINEAR_LEAVES:
            shapes[(rows, cols)] += 1
        elif leaf in CONV1D_LEAVES:
            shapes[(cols, rows)] += 1
        elif leaf in TOKEN_EMBEDDINGS:
            embedding = (rows, cols)
    if not shapes:
        raise ValueError("the manifest lists no frozen linear weights of a known layout (Llama or GPT-2 names)")
    return shapes, head or embedding


def _eager(shape: Shape, tokens: int) -> Callable[[], object]:
    import torch

    weight, x = torch.randn(*shape), torch.randn(tokens, shape[1])

    def run() -> object:
        with torch.no_grad():
            return torch.nn.functional.linear(x, weight)

    return run


def _xnnpack(shape: Shape, tokens: int) -> Callable[[], object]:
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.extension.pybindings.portable_lib import _load_for_executorch_from_buffer

    linear = torch.nn.Linear(shape[1], shape[0], bias=False).eval()
    x = torch.randn(tokens, shape[1])
    program = to_edge_transform_and_lower(torch.export.export(linear, (x,)),
                                          partitioner=[XnnpackPartitioner()]).to_executorch()
    buffer = program.buffer  # the loaded module reads from it: it must outlive the module
    module = _load_for_executorch_from_buffer(buffer)

    def run() -> object:
        return module.forward([x]), buffer

    return run


def _onnxruntime(shape: Shape, tokens: int, threads: int) -> Callable[[], object]:
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((shape[1], shape[0]), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [tokens, shape[1]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [tokens, shape[0]])],
        [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9  # what every ORT build of the last years reads
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = rng.standard_normal((tokens, shape[1]), dtype=np.float32)
    return lambda: session.run(["y"], {"x": x})


@contextmanager
def thread_count(threads: int) -> Iterator[None]:
    """torch's and ExecuTorch's thread pools at `threads`, restored afterwards (a caller's process,
    e.g. a test run, keeps its own settings)."""
    import torch

    from edge_runtime.artifacts.executorch_runtime import runtime

    et = runtime()
    before = torch.get_num_threads(), et._threadpool_get_thread_count()
    torch.set_num_threads(threads)
    et._unsafe_reset_threadpool(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        et._unsafe_reset_threadpool(before[1])


def gemm_floor(runtime: str, linears: Mapping[Shape, int], tokens: int, threads: int) -> dict[str, Any]:
    """Seconds of one prefill's linears in `runtime`; run in a process of its own (thread pools of
    the other runtimes would otherwise spin on the same cores)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose one of {RUNTIMES}")
    per_shape = {}
    with thread_count(threads):
        for shape in sorted(linears):
            if runtime == "eager":
                fn = _eager(shape, tokens)
            elif runtime == "executorch_xnnpack":
                fn = _xnnpack(shape, tokens)
            else:
                fn = _onnxruntime(shape, tokens, threads)
            per_shape[shape] = statistics.median(time_calls(fn, warmup=3, repeats=15))
    seconds = sum(per_shape[s] * n for s, n in linears.items())
    flops = sum(2 * tokens * s[0] * s[1] * n for s, n in linears.items())
    return {"runtime": runtime, "seconds": seconds, "gflop": flops / 1e9, "gflops_per_s": flops / seconds / 1e9,
            "per_shape_s": {f"{s[0]}x{s[1]}": per_shape[s] for s in sorted(per_shape)}}


def prefill_floor(runtime: str, parameters: Iterable[Mapping[str, Any]], tokens: int, head_tokens: int,
                  threads: int) -> dict[str, Any]:
    """`gemm_floor` of a whole prefill: the blocks' linears on `tokens` rows, the LM head on
    `head_tokens` (1 for a generation prefill, `tokens` for scoring every position)."""
    blocks, head = prefill_linears(parameters)
    floor = gemm_floor(runtime, blocks, tokens, threads)
    if head is not None and head_tokens > 0:
        on_head = gemm_floor(runtime, Counter({head: 1}), head_tokens, threads)
        floor["seconds"] += on_head["seconds"]
        floor["gflop"] += on_head["gflop"]
        floor["gflops_per_s"] = floor["gflop"] / floor["seconds"]
        floor["per_shape_s"].update({f"head {k} x {head_tokens} tokens": v for k, v in on_head["per_shape_s"].items()})
    return floor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, required=True, help="an export directory (its manifest.json)")
    parser.add_argument("--runtime", choices=RUNTIMES, default="eager", help="default: %(default)s")
    parser.add_argument("--tokens", type=int, default=128, help="rows of each matmul (default: %(default)s)")
    parser.add_argument("--head-tokens", type=int, default=1,
                        help="rows of the LM head: 1 for a generation prefill (default), --tokens for scoring")
    parser.add_argument("--threads", type=int, default=2, help="default: %(default)s")
    args = parser.parse_args(argv)
    manifest = json.loads((args.artifacts / "manifest.json").read_text())
    print(json.dumps(prefill_floor(args.runtime, manifest["parameters"], args.tokens, args.head_tokens,
                                   args.threads)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
