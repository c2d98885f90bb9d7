"""Fixtures for the data tests: fake unpacked packages and a byte-level tokenizer (helpers in data_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_runtime.data.sources import DirectoryProvider

from .data_helpers import byte_tokenizer, make_all_sources


@pytest.fixture(scope="session")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="session")
def sources_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_all_sources(tmp_path_factory.mktemp("sources"))


@pytest.fixture
def provider(sources_root: Path) -> DirectoryProvider:
    return DirectoryProvider(sources_root, stdlib=False)
