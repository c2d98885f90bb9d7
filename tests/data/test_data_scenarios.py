"""Scenario preparation: deterministic, split by document, OOD mixing, user directories, loading back."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.data.scenarios import (
    ScenarioError,
    build_scenario,
    load_scenario,
    prepare_scenario,
)
from edge_runtime.data.tokens import SPLITS

from .data_helpers import make_devices_dir

SEQ_LEN = 16


def file_hashes(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def ids_by_split(device_dir: Path) -> dict[str, list[str]]:
    return json.loads((device_dir / "documents.json").read_text())


def module_of(doc_id: str) -> str:
    return doc_id.split(":", 1)[1].split("/")[1]  # libreoffice-help-en-us:text/<module>/...


@pytest.mark.parametrize("scenario", ["languages", "topics", "topics-ood", "domains"])
def test_preparation_is_deterministic_and_splits_share_no_document(scenario, provider, tokenizer, tmp_path):
    first = prepare_scenario(scenario, tmp_path / "a", tokenizer, provider=provider, seq_len=SEQ_LEN, seed=3)
    second = prepare_scenario(scenario, tmp_path / "b", tokenizer, provider=provider, seq_len=SEQ_LEN, seed=3)
    assert file_hashes(first) == file_hashes(second)  # byte-identical, scenario.json included
    info = json.loads((first / "scenario.json").read_text())
    assert [d["directory"] for d in info["devices"]] == sorted(p.name for p in first.iterdir() if p.is_dir())
    assert len(info["devices"]) == 4 and info["seed"] == 3 and info["tokenizer"]["vocab_size"] == len(tokenizer)
    assert str(tmp_path) not in (first / "scenario.json").read_text()  # no machine paths in hashed content
    assert all("root" not in source for source in info["sources"])
    for device in info["devices"]:
        ids = ids_by_split(first / device["directory"])
        sets = {split: set(ids[split]) for split in SPLITS}
        assert all(sets[s] for s in SPLITS)
        assert not (sets["train"] & sets["valid"]) and not (sets["train"] & sets["test"])
        assert not (sets["valid"] & sets["test"])
    other_seed = prepare_scenario(scenario, tmp_path / "c", tokenizer, provider=provider, seq_len=SEQ_LEN, seed=4)
    assert json.loads((other_seed / "scenario.json").read_text())["content_hash"] != info["content_hash"]


def test_token_files_hold_the_split_documents_joined_by_eos(provider, tokenizer, tmp_path):
    out = prepare_scenario("domains", tmp_path, tokenizer, provider=provider, seq_len=SEQ_LEN)
    built = build_scenario("domains", provider)
    scenario = load_scenario(out)
    for device, docs in zip(scenario.devices, built.devices, strict=True):
        assert device.name == docs.name
        splits = device.splits()
        for split in SPLITS:
            tokens = np.asarray(splits[split].tokens)
            assert tokens[-1] == tokenizer.eos_token_id
            assert (tokens == tokenizer.eos_token_id).sum() == len(docs.splits[split])
            text = tokenizer.decode(tokens[: int(np.argmax(tokens == tokenizer.eos_token_id))])
            assert text == docs.splits[split][0].text
            assert device.tokens[split] == tokens.size


def test_languages_decide_a_page_split_once_for_every_language(provider, tokenizer, tmp_path):
    built = build_scenario("languages", provider, seed=1)
    assert [d.name for d in built.devices] == ["de", "fr", "it", "nl"]
    split_of_key: dict[str, str] = {}
    for device in built.devices:
        for split, docs in device.splits.items():
            assert all(doc.source == f"libreoffice-help-{device.name}" for doc in docs)
            for doc in docs:
                assert split_of_key.setdefault(doc.key, split) == split  # same page, same split everywhere
    modules = {key.split("/")[1] for key in split_of_key}
    assert "shared" in modules and "sbasic" in modules  # all modules


def test_topics_ood_mixes_train_and_isolates_valid_and_test(provider):
    topics = build_scenario("topics", provider, seed=2)
    ood = build_scenario("topics-ood", provider, seed=2)
    expected = {"basic": {"sbasic"}, "calc": {"scalc", "schart"}, "writer": {"swriter"},
                "impress-draw-other": {"simpress", "sdraw", "smath", "sdatabase"}}
    for device in topics.devices:  # plain topics: every split is the device's own modules, no 'shared'
        for docs in device.splits.values():
            assert {module_of(d.id) for d in docs} <= expected[device.name]
    trains = []
    for plain, mixed in zip(topics.devices, ood.devices, strict=True):
        assert plain.name == mixed.name
        assert mixed.splits["valid"] == plain.splits["valid"] and mixed.splits["test"] == plain.splits["test"]
        assert {module_of(d.id) for d in mixed.splits["valid"] + mixed.splits["test"]} <= expected[mixed.name]
        groups = {name for name, modules in expected.items() if {module_of(d.id) for d in mixed.splits["train"]}
                  & modules}
        assert groups == set(expected)  # trains on all four modules
        trains.append({d.id for d in mixed.splits["train"]})
    for i in range(4):
        for j in range(i + 1, 4):
            assert not trains[i] & trains[j]  # disjoint quarters
    assert set().union(*trains) == {d.id for device in topics.devices for d in device.splits["train"]}
    sizes = [len(t) for t in trains]
    assert max(sizes) - min(sizes) <= 4  # one document per module at most between devices


def test_cap_takes_a_seeded_subset_of_whole_documents_before_splitting(provider):
    full = build_scenario("domains", provider)
    capped = build_scenario("domains", provider, max_chars_per_device=3000)
    again = build_scenario("domains", provider, max_chars_per_device=3000)
    reseeded = build_scenario("domains", provider, max_chars_per_device=3000, seed=9)
    for whole, device, same, other in zip(full.devices, capped.devices, again.devices, reseeded.devices, strict=True):
        docs = [d for split in SPLITS for d in device.splits[split]]
        assert sum(len(d.text) for d in docs) <= 3000
        assert {d.id for d in docs} < {d.id for split in SPLITS for d in whole.splits[split]}
        assert device.splits == same.splits
        assert {d.id for d in docs} != {d.id for split in SPLITS for d in other.splits[split]} or len(docs) < 4


def test_user_directories_of_txt_and_jsonl(tokenizer, tmp_path):
    devices_dir = make_devices_dir(tmp_path / "mine")
    out = prepare_scenario("dir", tmp_path / "out", tokenizer, devices_dir=devices_dir, seq_len=SEQ_LEN, name="mine")
    scenario = load_scenario(out)
    assert scenario.name == "mine" and [d.name for d in scenario.devices] == ["alpha", "beta-team"]
    assert [d.directory.name for d in scenario.devices] == ["0-alpha", "1-beta-team"]
    alpha = [i for ids in ids_by_split(out / "0-alpha").values() for i in ids]
    beta = [i for ids in ids_by_split(out / "1-beta-team").values() for i in ids]
    assert sorted(alpha) == [f"alpha:note{i}.txt" for i in range(6)]  # empty.txt dropped
    assert sorted(beta) == sorted(f"beta team:nested/mail.jsonl:{n}" for n in (1, 2, 3, 5, 6, 7))
    again = prepare_scenario("dir", tmp_path / "out2", tokenizer, devices_dir=devices_dir, seq_len=SEQ_LEN,
                             name="mine")
    assert file_hashes(out) == file_hashes(again)


def test_load_scenario_catches_a_corrupted_token_file(provider, tokenizer, tmp_path):
    out = prepare_scenario("topics", tmp_path, tokenizer, provider=provider, seq_len=SEQ_LEN)
    scenario = load_scenario(out)
    assert scenario.content_hash == json.loads((out / "scenario.json").read_text())["content_hash"]
    path = scenario.devices[1].directory / "valid.npy"
    path.write_bytes(path.read_bytes()[:-2] + b"\x00\x00")
    with pytest.raises(ScenarioError, match="does not match its manifest"):
        load_scenario(out)
    load_scenario(out, verify=False)
    with pytest.raises(ScenarioError, match="not a prepared scenario"):
        load_scenario(tmp_path / "nothing")


def test_preparing_again_replaces_the_scenario_atomically(tokenizer, tmp_path):
    devices_dir = make_devices_dir(tmp_path / "mine")
    out = prepare_scenario("dir", tmp_path / "out", tokenizer, devices_dir=devices_dir, seq_len=SEQ_LEN)
    (devices_dir / "beta team").rename(devices_dir / "gamma")
    out = prepare_scenario("dir", tmp_path / "out", tokenizer, devices_dir=devices_dir, seq_len=SEQ_LEN)
    assert sorted(p.name for p in out.iterdir()) == ["0-alpha", "1-gamma", "scenario.json"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["dir"]  # no staging or old copies left


# -- bad input ------------------------------------------------------------------------------------


def test_unknown_scenario(provider):
    with pytest.raises(ScenarioError, match=r"unknown scenario 'nope'; choose one of languages, topics"):
        build_scenario("nope", provider)


def test_device_directory_without_usable_text(tmp_path):
    devices_dir = make_devices_dir(tmp_path / "mine")
    (devices_dir / "silent").mkdir()
    (devices_dir / "silent/readme.md").write_text("not a .txt file")
    (devices_dir / "silent/blank.txt").write_text("\n\n")
    with pytest.raises(ScenarioError, match=r"silent has no usable text \(2 file\(s\).*put \.txt files"):
        build_scenario("dir", devices_dir=devices_dir)
    with pytest.raises(ScenarioError, match="has no subdirectories"):
        build_scenario("dir", devices_dir=tmp_path / "mine" / "alpha")
    with pytest.raises(ScenarioError, match="is not a directory"):
        build_scenario("dir", devices_dir=tmp_path / "missing")
    with pytest.raises(ScenarioError, match="needs --devices-dir"):
        build_scenario("dir")


def test_bad_jsonl_line_names_the_file_and_line(tmp_path):
    device = tmp_path / "mine" / "d"
    device.mkdir(parents=True)
    (device / "a.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(ScenarioError, match=r"a\.jsonl:2 has no string \"text\" field"):
        build_scenario("dir", devices_dir=tmp_path / "mine")
    (device / "a.jsonl").write_text("not json\n")
    with pytest.raises(ScenarioError, match=r"a\.jsonl:1 is not valid JSON"):
        build_scenario("dir", devices_dir=tmp_path / "mine")


def test_too_few_documents_for_three_splits(tmp_path):
    device = tmp_path / "mine" / "small"
    device.mkdir(parents=True)
    for i in range(2):
        (device / f"{i}.txt").write_text("some text " * 10)
    with pytest.raises(ScenarioError, match=r"device 0-small has 2 document\(s\).*needs at least 3"):
        build_scenario("dir", devices_dir=tmp_path / "mine")


def test_split_too_small_for_one_window_names_device_and_split(tokenizer, tmp_path):
    devices_dir = make_devices_dir(tmp_path / "mine")
    with pytest.raises(ScenarioError, match=r"device 0-alpha: the valid split has \d+ tokens .*fewer than one training "
                                            r"window of 1001 \(--seq-len 1000 \+ 1\).*smaller --seq-len"):
        prepare_scenario("dir", tmp_path / "out", tokenizer, devices_dir=devices_dir, seq_len=1000)
    assert not (tmp_path / "out" / "dir").exists()


def test_output_name_must_be_a_plain_directory_name(tokenizer, tmp_path):
    with pytest.raises(ScenarioError, match="must be a plain directory name"):
        prepare_scenario("dir", tmp_path, tokenizer, devices_dir=make_devices_dir(tmp_path / "m"), name="../x")


def test_cap_too_small_for_any_document(provider):
    with pytest.raises(ScenarioError, match=r"has 0 document\(s\).*raise --max-chars-per-device"):
        build_scenario("topics", provider, max_chars_per_device=10)
    with pytest.raises(ScenarioError, match="must be positive"):
        build_scenario("topics", provider, max_chars_per_device=0)


def test_source_with_the_wrong_layout_says_so(tmp_path, tokenizer):
    from edge_runtime.data.sources import DirectoryProvider

    (tmp_path / "libreoffice-help-en-us" / "something").mkdir(parents=True)
    with pytest.raises(ScenarioError, match="libreoffice-help-en-us local does not have the expected layout"):
        build_scenario("topics", DirectoryProvider(tmp_path))
