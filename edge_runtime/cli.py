"""The single `comigs` command line.

Each area of the product registers its own subcommands (`register(subparsers)`) and imports
its heavy dependencies only when one of its commands runs, so `comigs --help` and
`comigs sync ...` start without loading torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Modules that contribute subcommands, in the order `comigs --help` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "edge_runtime.commands",
    "edge_runtime.model.cli",
    "edge_runtime.data.cli",
    "edge_runtime.simulation.cli",
    "edge_runtime.agent.cli",
    "sync_service.cli",
    "export.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="comigs",
        description=(
            "CoMiGS on the edge: collaborative fine-tuning of a frozen causal LM with shared "
            "generalist and private specialist LoRA experts. Run `comigs demo` for a first taste, "
            "or `comigs COMMAND --help` for any command below."
        ),
    )
    from edge_runtime import __version__

    parser.add_argument("--version", action="version", version=f"comigs-edge {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # an area that is not built yet contributes no commands
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
