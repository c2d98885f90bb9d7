"""Session fixtures of the device-agent tests: certificate, tiny model directory, one ExecuTorch export."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from .edge_helpers import AGENT_SEED, RANK, SEQ_LEN, save_tiny_model
from tests.sync.sync_helpers import Tls, make_tls

EXPORT_BATCH = 2


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    return make_tls(tmp_path_factory.mktemp("edge-tls"))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("edge-model") / "tiny-llama")


@pytest.fixture(scope="session")
def et_artifacts(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    """The training program of exactly the model an eager agent builds (same init seed), so the two
    backends start from identical specialists and routers."""
    from edge_runtime.agent.loop import build_device_model
    from export.pipeline import ExportOptions, export_artifacts

    out = tmp_path_factory.mktemp("edge-export") / "artifacts"
    model = build_device_model(str(model_dir), "1,1", RANK, AGENT_SEED)
    options = ExportOptions(formats=("pte-train",), train_batch=EXPORT_BATCH, train_seq_len=SEQ_LEN,
                            train_backend="portable", train_generalists=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_artifacts(model, out, options, source="tests/edge")
    return out
