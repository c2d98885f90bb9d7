"""Regenerate the committed protobuf/gRPC Python modules from the ``.proto`` contract.

protoc names its output after the proto's path (``comigs/sync/v1/sync_pb2.py``, importing
``comigs.sync.v1``), but we ship the code inside ``sync_service.proto`` rather than as a new top-level
``comigs`` package, so this script moves the files and rewrites the two places that name the module.
The rewrite is a fixed textual substitution, which keeps the result reproducible: the regeneration test
runs exactly this function and diffs the output with the committed files.

Usage: ``python -m sync_service.proto.regen [--check]`` (needs the ``grpcio-tools`` dev dependency).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "protos"
PROTO_FILE = "comigs/sync/v1/sync.proto"
PACKAGE_DIR = Path(__file__).resolve().parent
GENERATED_FILES = ("sync_pb2.py", "sync_pb2.pyi", "sync_pb2_grpc.py")

_ORIGINAL_MODULE = "comigs.sync.v1.sync_pb2"
_TARGET_MODULE = "sync_service.proto.sync_pb2"
_SUBSTITUTIONS = {
    "sync_pb2_grpc.py": [
        (
            "from comigs.sync.v1 import sync_pb2 as comigs_dot_sync_dot_v1_dot_sync__pb2",
            "from sync_service.proto import sync_pb2 as comigs_dot_sync_dot_v1_dot_sync__pb2",
        )
    ],
    "sync_pb2.py": [(f"'{_ORIGINAL_MODULE}'", f"'{_TARGET_MODULE}'")],
    "sync_pb2.pyi": [],
}


def generate(out_dir: Path, proto_root: Path = PROTO_ROOT) -> dict[str, bytes]:
    """Run protoc on the contract and return {file name: content} after the import rewrite.

    Writes the files into ``out_dir`` as well. Raises RuntimeError if protoc fails or if an expected
    substitution no longer applies (a new grpcio-tools changed its output: update this script).
    """
    from grpc_tools import protoc  # dev dependency; imported only when regenerating

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        include = Path(protoc.__file__).resolve().parent / "_proto"
        args = [
            "grpc_tools.protoc",
            f"-I{proto_root}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            str(proto_root / PROTO_FILE),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto_root / PROTO_FILE}")
        generated_dir = Path(tmp) / Path(PROTO_FILE).parent
        result: dict[str, bytes] = {}
        for name in GENERATED_FILES:
            text = (generated_dir / name).read_text(encoding="utf-8")
            for old, new in _SUBSTITUTIONS[name]:
                if old not in text:
                    raise RuntimeError(f"expected text not found in generated {name}: {old!r}")
                text = text.replace(old, new)
            if name.endswith(".pyi"):
                # pyproject's ruff exclude matches only *_pb2*.py; the stub is generated code too.
                text = "# ruff: noqa\n" + text
            result[name] = text.encode("utf-8")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, content in result.items():
        (out_dir / name).write_bytes(content)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sync_service.proto.regen",
        description="Regenerate sync_service/proto/sync_pb2*.py from protos/comigs/sync/v1/sync.proto.",
    )
    parser.add_argument(
        "--check", action="store_true", help="only compare with the committed files; exit 1 if they differ"
    )
    args = parser.parse_args(argv)
    if not args.check:
        generate(PACKAGE_DIR)
        print(f"regenerated {', '.join(GENERATED_FILES)} in {PACKAGE_DIR}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
    stale = [name for name, content in fresh.items() if (PACKAGE_DIR / name).read_bytes() != content]
    if stale:
        print(f"stale generated files: {', '.join(stale)}; run python -m sync_service.proto.regen")
        return 1
    print("generated files are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
