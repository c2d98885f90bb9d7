"""`comigs edge demo` end to end on the tiny model: coordinator, four agents, local-only run, export (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_runtime.cli import main

from .edge_helpers import make_device_data

pytestmark = pytest.mark.slow  # four agent processes, four local trainings and an export: about a minute


def test_demo_runs_four_devices_and_exports_device_0(tmp_path: Path, model_dir: Path, capsys) -> None:
    scenario = tmp_path / "scenario"
    for i, language in enumerate(("de", "fr", "it", "nl")):
        make_device_data(scenario / f"{i}-{language}", seed=i + 1)
    code = main(["edge", "demo", "--out", str(tmp_path / "run"), "--data", str(scenario), "--model", str(model_dir),
                 "--rounds", "2", "--local-steps", "4", "--batch-size", "4", "--seq-len", "16", "--rank", "4",
                 "--router-every", "2", "--router-steps", "1", "--eval-tokens", "500"])
    out = capsys.readouterr().out
    assert code == 0, out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [d["experts"] for d in summary["devices"]] == ["1,0", "1,1", "1,1", "1,3"]
    for device in summary["devices"]:
        assert device["rounds"] == 2
        assert device["comigs_test_ppl"] < device["base_test_ppl"]
        assert device["local_only_test_ppl"] < device["base_test_ppl"]
    assert (Path(summary["artifacts"]) / "manifest.json").is_file()
    assert "test perplexity" in out and "local-only" in out
