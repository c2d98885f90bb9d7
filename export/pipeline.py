"""`export_artifacts`: a CoMiGS model -> a verified artifact directory, all or nothing.

Order of work (see the modules for the why of each step):
1. check options and that the output can be written, before any expensive step;
2. put the model in its exportable form (dense experts, explicit attention, eval);
3. trace every requested format with distinct placeholder values in the pluggable tensors, in a
   staging directory beside the target, and write the real expert values into the data files;
4. write the manifest, run the self-check through the device loaders (real experts, then random
   swapped-in experts) and record its numbers in the manifest;
5. rename the staging directory to the target. Any failure deletes the staging directory.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from torch import nn

from edge_runtime.artifacts.layout import ALL_FORMATS
from edge_runtime.artifacts.manifest import MANIFEST_FILE, Manifest, dumps
from edge_runtime.storage import atomic_write_bytes
from export.compact_partitioning import compact_dependency_viewers
from export.delegate_order import late_delegate_order
from export.errors import ExportError
from export.executorch_inference import export_inference
from export.executorch_training import export_training
from export.fx_source_cache import source_cache_disabled
from export.manifest import build_manifest
from export.onnx_export import export_onnx
from export.pluggable import pluggable_state, random_pluggables, values_installed
from export.prepare import model_max_positions, prepare_for_export, quiet_export_warnings
from export.staging import commit, create_staging, discard
from export.training_loss import LOSS_CHUNK
from export.verify import Tolerance, verify_artifacts

Progress = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """What to export and for which shapes (CLI flags of `comigs export`)."""

    formats: tuple[str, ...] = ALL_FORMATS
    batch: int = 1  # inference .pte batch (fixed; the sequence length is dynamic)
    max_seq_len: int | None = None  # longest sequence the inference artifacts accept; None: min(512, model)
    onnx_max_batch: int = 64
    train_batch: int = 1
    train_seq_len: int = 128
    train_generalists: bool = False
    train_backend: Literal["xnnpack", "portable"] = "xnnpack"
    train_loss_chunk: int = LOSS_CHUNK  # vocabulary rows per LM-head chunk in pte-train (training_loss.py)
    seed: int = 0
    verify: bool = True
    overwrite: bool = False
    tolerance: Tolerance = Tolerance()

    def __post_init__(self) -> None:
        unknown = [f for f in self.formats if f not in ALL_FORMATS]
        if unknown or not self.formats:
            raise ExportError(f"unknown format(s) {unknown or '(none)'}; choose from {', '.join(ALL_FORMATS)}.")
        if len(set(self.formats)) != len(self.formats):
            raise ExportError(f"format listed twice in {','.join(self.formats)}.")
        for field in ("batch", "onnx_max_batch", "train_batch", "train_loss_chunk"):
            if getattr(self, field) < 1:
                raise ExportError(f"{field} must be >= 1, got {getattr(self, field)}.")
        if (self.max_seq_len is not None and self.max_seq_len < 2) or self.train_seq_len < 2:
            raise ExportError("sequence lengths must be >= 2.")
        if self.train_backend not in ("xnnpack", "portable"):
            raise ExportError(f"train backend must be xnnpack or portable, got {self.train_backend!r}.")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["formats"] = list(self.formats)
        return data


def parse_formats(text: str) -> tuple[str, ...]:
    return tuple(f.strip() for f in text.split(",") if f.strip())


DEFAULT_MAX_SEQ_LEN = 512


def _resolve_shapes(model: nn.Module, options: ExportOptions) -> ExportOptions:
    """Fill in the default sequence length and refuse lengths the model has no positions for."""
    limit = model_max_positions(model)
    if options.max_seq_len is None:
        options = dataclasses.replace(options, max_seq_len=min(DEFAULT_MAX_SEQ_LEN, limit or DEFAULT_MAX_SEQ_LEN))
    longest = max(options.max_seq_len, options.train_seq_len if "pte-train" in options.formats else 0)
    if limit is not None and longest > limit:
        raise ExportError(f"sequence length {longest} exceeds the model's {limit} positions; lower --max-seq-len / "
                          "--train-seq-len.")
    return options


def export_artifacts(model: nn.Module, out_dir: str | Path, options: ExportOptions | None = None, *,
                     source: str = "model", progress: Progress | None = None) -> Manifest:
    """Export `model` (a CoMiGS-injected causal LM) to `out_dir`; returns the committed manifest.

    The model is switched to its exportable form in place (dense expert mixing, explicit
    attention, eval mode); its parameter values are left as they were. `source` describes where
    the expert values came from (recorded in the manifest).
    """
    with quiet_export_warnings(), source_cache_disabled(), compact_dependency_viewers(), late_delegate_order():
        return _export_artifacts(model, out_dir, options or ExportOptions(), source, progress)


def _export_artifacts(model: nn.Module, out_dir: str | Path, options: ExportOptions, source: str,
                      progress: Progress | None) -> Manifest:
    say = progress or (lambda _msg: None)
    config = prepare_for_export(model)
    options = _resolve_shapes(model, options)
    target = Path(out_dir).absolute()
    staging = create_staging(target, options.overwrite)
    try:
        real = pluggable_state(model)
        placeholders = random_pluggables(model, seed=options.seed)
        export_id = secrets.randbits(62)
        artifacts: dict[str, dict[str, Any]] = {}
        with values_installed(model, placeholders):
            for fmt in options.formats:
                say(f"exporting {fmt} ...")
                started = time.perf_counter()
                artifacts[fmt] = _export_one(model, fmt, options, export_id, placeholders, real, staging)
                say(f"exported {fmt} in {time.perf_counter() - started:.1f} s")
        data = build_manifest(model, config, artifacts, export_id, staging, real, source, options.to_dict())
        atomic_write_bytes(staging / MANIFEST_FILE, dumps(data))
        if options.verify:
            say("verifying the artifacts against the eager model ...")
            checks = random_pluggables(model, seed=options.seed + 1)
            reports = verify_artifacts(staging, artifacts, model, checks, options.tolerance, options.seed)
            for fmt, report in reports.items():
                data["artifacts"][fmt]["verification"] = report
            atomic_write_bytes(staging / MANIFEST_FILE, dumps(data))
        commit(staging, target)
    except BaseException:
        discard(staging)
        raise
    return Manifest.load(target)


def _export_one(model: nn.Module, fmt: str, options: ExportOptions, export_id: int, placeholders: Any,
                real: Any, staging: Path) -> dict[str, Any]:
    common = dict(export_id=export_id, placeholders=placeholders, real_values=real, staging=staging)
    if fmt in ("pte", "pte-xnnpack"):
        return export_inference(model, fmt=fmt, backend="portable" if fmt == "pte" else "xnnpack",
                                batch=options.batch, max_seq_len=options.max_seq_len, **common)
    if fmt == "pte-train":
        return export_training(model, fmt=fmt, backend=options.train_backend, batch=options.train_batch,
                               seq_len=options.train_seq_len, train_generalists=options.train_generalists,
                               loss_chunk=options.train_loss_chunk, **common)
    return export_onnx(model, fmt=fmt, max_batch=options.onnx_max_batch, max_seq_len=options.max_seq_len, **common)
