"""Upload admission: at most `capacity` upload streams at once, the others told when to come back.

Why: every open upload stream costs the coordinator a handler thread and gRPC buffers (flow-control
window, TLS records, a message being parsed), so memory grew with the number of devices that happened
to finish training at the same moment. With slots, a round of 10,000 devices streams like a
round of `capacity` devices; the rest wait on their side, not in the server (the "pace steering" of
Bonawitz et al., "Towards Federated Learning at Scale", 2019). Measured with 200 TLS devices
(benchmarks/RESULTS.md): 1-2 deltas less peak memory than without admission.

Order: the queue (first come, first served) decides each device's hint, so devices come back in
roughly the order they asked; a freed slot goes first to the devices *parked* in `acquire` (in the
order they parked), then to whoever asks. A queued device asleep until its hint holds no claim:
with strict first-come-first-served, slots stayed free while their owners slept (12 slots, 200
devices: 3 streams on average while 76 devices waited).

Protocol: a device calls AcquireUploadSlot; granted, it opens UploadDelta within `grant_ttl_s`; not
granted, it asks again after the `retry_after_s` it is given (a little before its estimated turn, from
the measured stream durations). A stream opened without a grant is still admitted while a slot is
free that no parked device is owed (old clients and light load need no extra call); otherwise it gets
RESOURCE_EXHAUSTED before a byte of payload is read.

Hints err early. A device told to come back too soon costs one more short call; a device told to come
back too late leaves a slot idle, and hints given to a whole burst of devices at once fix the pace of
the round: with a pessimistic a-priori stream time (1 s where streams took 0.1-0.6 s), 200 devices
asking at the same instant were paced at ~15 uploads/s and 12 slots averaged 2 streams (ingest / raw
gRPC 0.40 against 0.67 with a 0.2 s guess, benchmarks/RESULTS.md). So the guess before any stream has
finished is optimistic, and the estimate is robust to outliers: the median of the latest durations
(one stalled device does not stretch everyone's wait), raised to the age of the streams in progress
when those already run longer (a slow link is noticed before its first stream finishes).

Hints reach no further than the evidence behind them: at most `TRUST` times as far ahead as the queue
has existed (at least `TRUST_MIN_S`). The stream times measured in the first second of a burst are
those of streams competing with every device's TLS handshake and first call, two to four times the
steady state, and nearly every device of the burst asks in that second; hints extrapolated 30 s from
them sent most of a 400-device burst to sleep far past its turn, and after 8 s the 12 slots averaged
2-3 streams while 150 devices slept (benchmarks/RESULTS.md, session 15). Capped, a device far back is
told to come back within a few seconds, then gets a longer hint from a better estimate; in a queue
that has existed for a while the cap is out of the way.

Pure bookkeeping over device names and a clock, no gRPC: the servicer maps the answers to messages.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

#: Bounds of the "ask again" hint. The hint is the expected time until the device's turn, so a device
#: far back in the queue sleeps until then instead of polling (hundreds of waiting devices must not turn
#: into a polling storm); the floor keeps the devices next in line from spinning.
MIN_RETRY_S = 0.02
MAX_RETRY_S = 30.0
#: Devices are told to come back a little before their estimated turn, so that free slots do not wait
#: for them (measured with 200 devices and 12 slots: at the plain estimate ~5 streams on average, at
#: 0.75 of it 11.3, at 0.5 of it 11.2 but 6.6 polls per upload instead of 4.3).
EARLY = 0.75
#: A hint reaches at most TRUST x the age of the queue (the time since it last formed) ahead, and at
#: least TRUST_MIN_S (see the module docstring). Measured (ad-hoc A/B, 200 TLS devices, 3 bursts each):
#: ingest / raw gRPC 0.47 uncapped, 0.56 / 0.64 with factor 2 / 4, 4.3 / 4.9 / 4.8 slot requests per
#: upload; 400 devices, factor 2 / 4 / 8: 0.61 / 0.65 / 0.61 (uncapped 0.37 in an earlier run), 5.5 /
#: 5.5 / 3.7 requests, 11.4 / 11.4 / 8.4 of 12 slots streaming.
TRUST = 4.0
TRUST_MIN_S = 1.0
#: The stream duration assumed until one has been measured: a 6 MB delta over a fast link. Optimistic on
#: purpose (see the module docstring); slow links correct it within one stream time.
INITIAL_STREAM_S = 0.05


@dataclass(frozen=True)
class Grant:
    granted: bool
    #: Not granted: ask again after this long. Granted: open the stream within this long.
    retry_after_s: float
    #: Not granted: devices waiting ahead of this one.
    position: int = 0


class UploadSlots:
    """Admission of upload streams (see the module docstring). Thread-safe; O(queue) at worst.

    `grant_ttl_s`: how long a granted slot waits for its stream before it is given to the next device.
    `queue_ttl_s`: a waiting device that has not asked again for this long has gone away and loses its
    place (it joins at the back if it returns).
    `trust`: hints reach at most this many times the queue's age ahead (see the module docstring);
    None: as far as the estimate says (up to MAX_RETRY_S).
    `parked`: how many devices without a slot may wait *in* `acquire` (a long poll, each holding a
    handler thread) for up to `park_s`, so that a freed slot is taken at once instead of at the next
    poll.
    """

    def __init__(
        self,
        capacity: int,
        *,
        grant_ttl_s: float = 10.0,
        queue_ttl_s: float = 30.0,
        initial_stream_s: float = INITIAL_STREAM_S,
        trust: float | None = TRUST,
        parked: int = 0,
        park_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity < 1:
            raise ValueError("upload slot capacity must be >= 1")
        if parked < 0:
            raise ValueError("parked must be >= 0")
        self.capacity = capacity
        self._grant_ttl = grant_ttl_s
        self._queue_ttl = queue_ttl_s
        self._parked_max = parked
        self._park_s = park_s
        self._parked: list[str] = []  # devices waiting inside acquire, in the order they parked
        self._clock = clock
        self._lock = threading.Condition()
        self._granted: dict[str, float] = {}  # device -> grant expiry
        self._streaming: dict[str, float] = {}  # device -> stream start
        self._waiting: OrderedDict[str, float] = OrderedDict()  # device -> last time it asked
        self._initial_stream_s = initial_stream_s
        self._trust = trust
        self._durations: deque[float] = deque(maxlen=2 * capacity)  # the latest finished streams
        self._queued_since = clock()  # when the queue last went from empty to non-empty

    # ------------------------------------------------------------------ device-facing

    def acquire(self, device: str) -> Grant:
        """A device asks for a slot: granted now, or its place in the queue and when to ask again.

        While fewer than `parked` devices are parked, a device that gets no slot waits here up to
        `park_s` for one to free (woken by `leave`); parked devices are served in the order they parked.
        """
        with self._lock:
            grant = self._acquire_locked(device)
            if grant.granted or len(self._parked) >= self._parked_max:
                return grant
            self._parked.append(device)
            try:
                deadline = time.monotonic() + self._park_s
                while not grant.granted and (remaining := deadline - time.monotonic()) > 0:
                    self._lock.wait(remaining)
                    grant = self._acquire_locked(device)
                return grant
            finally:
                self._parked.remove(device)

    def _acquire_locked(self, device: str) -> Grant:
        now = self._clock()
        self._expire(now)
        if device in self._granted:  # not extended: asking again cannot hold a slot forever
            return Grant(True, self._granted[device] - now)
        if device in self._streaming:
            # Its previous stream has not ended on this side yet; the new one will be told so.
            return Grant(True, self._grant_ttl)
        if not self._waiting:
            self._queued_since = now  # a new queue: nothing seen of how fast it drains yet
        self._waiting[device] = now  # joins at the back, or keeps its place and refreshes it
        if self._has_free_slot(device):
            del self._waiting[device]
            self._granted[device] = now + self._grant_ttl
            return Grant(True, self._grant_ttl)
        return self._refusal(list(self._waiting).index(device), now)

    def enter(self, device: str) -> Grant:
        """An upload stream starts: admitted if the device holds a grant or a slot is free beyond those
        owed to parked devices."""
        with self._lock:
            now = self._clock()
            self._expire(now)
            if device in self._granted:
                del self._granted[device]
            elif not self._has_free_slot(device):
                return self._refusal(len(self._waiting), now)
            self._waiting.pop(device, None)
            self._streaming[device] = now
            return Grant(True, 0.0)

    def leave(self, device: str) -> None:
        """The device's upload stream ended (acknowledged, refused or broken): its slot is free."""
        with self._lock:
            started = self._streaming.pop(device, None)
            if started is not None:
                self._durations.append(max(self._clock() - started, 0.0))
                self._lock.notify_all()

    # ------------------------------------------------------------------ for operators and tests

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            self._expire(self._clock())
            return {
                "capacity": self.capacity,
                "streaming": len(self._streaming),
                "granted": len(self._granted),
                "waiting": len(self._waiting),
            }

    # ------------------------------------------------------------------ internals

    def _refusal(self, position: int, now: float) -> Grant:
        """No slot for a device with `position` devices queued ahead, and when to ask again: with every
        slot streaming, one frees about every stream_s / capacity seconds (Little's law), and its turn
        is that many freed slots away; no further ahead than the queue's age allows (`TRUST`)."""
        turns = max(position - (self.capacity - self._in_use()), 0) + 1
        hint = EARLY * turns * self._stream_estimate(now) / self.capacity
        hint = min(max(hint, MIN_RETRY_S), MAX_RETRY_S)
        if self._trust is not None:
            hint = min(hint, max(TRUST_MIN_S, self._trust * (now - self._queued_since)))
        return Grant(False, hint, position)

    def _stream_estimate(self, now: float) -> float:
        """How long an upload stream takes: the median of the latest finished ones (the a-priori guess
        before any), or the median age of those in progress if they already run longer."""
        finished = statistics.median(self._durations) if self._durations else self._initial_stream_s
        ages = sorted(now - started for started in self._streaming.values())
        return max(finished, ages[len(ages) // 2]) if ages else finished

    def _has_free_slot(self, device: str) -> bool:
        """A slot is free beyond those owed to the devices parked before this one.

        Only parked devices (present, waiting in `acquire`) have a claim. A queued device that is
        asleep until its hint does not: holding a free slot for it left most slots idle (measured, 200
        devices and 12 slots with strict first-come-first-served: on average 3 streams while 76 devices
        waited); it keeps its place for the hints and gets the next slot when it is back.
        """
        owed = self._parked.index(device) if device in self._parked else len(self._parked)
        return self.capacity - self._in_use() > owed

    def _in_use(self) -> int:
        return len(self._granted) + len(self._streaming)

    def _expire(self, now: float) -> None:
        for device in [d for d, expiry in self._granted.items() if expiry <= now]:
            del self._granted[device]
        while self._waiting:
            device, asked = next(iter(self._waiting.items()))
            if now - asked < self._queue_ttl:
                break
            del self._waiting[device]
