"""Fixtures for the sync tests (helpers live in sync_helpers.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sync_service.config import RoundConfig

from .sync_helpers import Coordinator, Tls, make_tls, start_coordinator


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    """A self-signed certificate for localhost / 127.0.0.1, made with `cryptography`."""
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def other_tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    """A second, unrelated certificate (a client trusting it must not trust the server)."""
    return make_tls(tmp_path_factory.mktemp("tls-other"))


@pytest.fixture
def coordinator_factory(tmp_path: Path, tls: Tls) -> Iterator[Callable[..., Coordinator]]:
    """Start in-process TLS coordinators on 127.0.0.1; all are stopped after the test."""
    started: list[Coordinator] = []

    def factory(devices: list[str], rounds: RoundConfig, **kwargs: object) -> Coordinator:
        coordinator = start_coordinator(tmp_path / f"c{len(started)}", tls, devices, rounds, **kwargs)
        started.append(coordinator)
        return coordinator

    yield factory
    for coordinator in started:
        coordinator.close()
