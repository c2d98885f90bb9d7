"""File names inside an export directory.

Files whose contents a swap rewrites (expert data, the ONNX graph that points at it) carry the
manifest *generation* in their name. A swap writes generation n+1 next to generation n and
then replaces manifest.json atomically; until that rename every reader still sees generation n
complete, afterwards generation n+1 complete. Files the swap never touches (programs, the
frozen base weights) keep one name.
"""

from __future__ import annotations

import re

# format name (as given to `comigs export --formats`) -> file stem
ARTIFACT_STEMS = {
    "pte": "inference-portable",
    "pte-xnnpack": "inference-xnnpack",
    "pte-train": "training",
    "onnx": "model",
}
ALL_FORMATS = tuple(ARTIFACT_STEMS)

_GENERATION = re.compile(r"\.g(\d{4,})\.")


def program_file(fmt: str) -> str:
    return f"{ARTIFACT_STEMS[fmt]}.pte"


def data_file(fmt: str, generation: int) -> str:
    """Where the pluggable tensors of an artifact live (ExecuTorch .ptd or ONNX external data)."""
    suffix = ".experts.bin" if fmt == "onnx" else ".experts.ptd"
    return f"{ARTIFACT_STEMS[fmt]}.g{generation:04d}{suffix}"


def onnx_model_file(generation: int) -> str:
    return f"{ARTIFACT_STEMS['onnx']}.g{generation:04d}.onnx"


def onnx_base_data_file() -> str:
    return f"{ARTIFACT_STEMS['onnx']}.base.bin"


def generation_of(file_name: str) -> int | None:
    match = _GENERATION.search(file_name)
    return int(match.group(1)) if match else None
