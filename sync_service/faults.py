"""Test-only crash points, so crash-safety tests can kill the server at an exact instant.

Set ``COMIGS_SYNC_CRASH_AT=<point>[:<n>]`` in the server's environment and the process SIGKILLs itself
the n-th time (default: first) it reaches `<point>`. Points:

* ``upload.before_commit``  upload file fsynced and renamed, database row not yet committed
* ``upload.after_commit``   row committed, acknowledgement not yet sent
* ``aggregate.after_tensor`` one more tensor of the new generalist was averaged (use :n for the n-th)
* ``publish.before_commit`` new generalist file durable, its database row not yet committed

Unset (always, in production) the check is one dictionary lookup. SIGKILL, not an exception, because
only an abrupt death without clean-up tests what a power cut or OOM kill would leave behind.
"""

from __future__ import annotations

import os
import signal
import threading

ENV_VAR = "COMIGS_SYNC_CRASH_AT"
POINTS = ("upload.before_commit", "upload.after_commit", "aggregate.after_tensor", "publish.before_commit")

_lock = threading.Lock()
_hits: dict[str, int] = {}


def _target() -> tuple[str, int] | None:
    spec = os.environ.get(ENV_VAR)
    if not spec:
        return None
    point, _, count = spec.partition(":")
    if point not in POINTS:
        raise ValueError(f"{ENV_VAR}={spec!r}: unknown crash point (known: {', '.join(POINTS)})")
    return point, int(count or 1)


def crash_point(point: str) -> None:
    """Die here, abruptly, if the environment asks for it."""
    target = _target()
    if target is None or target[0] != point:
        return
    with _lock:
        _hits[point] = _hits.get(point, 0) + 1
        if _hits[point] >= target[1]:
            os.kill(os.getpid(), signal.SIGKILL)
