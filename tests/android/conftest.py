"""Fixtures of the JVM conformance tests (helpers live in android_helpers.py)."""

from __future__ import annotations

import pytest

from .android_helpers import Jvm, build_jvm_harness
from tests.sync.sync_helpers import Tls, make_tls


@pytest.fixture(scope="session")
def jvm() -> Jvm:
    """The compiled harness (built once per session; skipped only when no JDK can be installed)."""
    paths, reason = build_jvm_harness()
    if paths is None:
        pytest.skip(f"JVM conformance tests need Debian's JDK + grpc-java and they cannot be installed: {reason}")
    return Jvm(*paths)


@pytest.fixture(scope="session")
def android_tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    return make_tls(tmp_path_factory.mktemp("android-tls"))
