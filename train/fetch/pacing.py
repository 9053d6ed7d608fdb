"""Pacing: the night-time window, the bandwidth cap and the backoff after a busy PACS.

Every wait goes through a :class:`Clock`, so tests swap in a clock whose
``sleep`` only moves its own time forward and then read the times fetch
recorded in its journal, instead of sleeping for real.
"""

from __future__ import annotations

import datetime as dt
import re
import threading
import time
from dataclasses import dataclass
from typing import Protocol


class Clock(Protocol):
    """Where fetch reads the time and waits."""

    def time(self) -> float:
        """Seconds since the epoch (``time.time``)."""
        ...

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds``."""
        ...


class SystemClock:
    """The real clock."""

    def time(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


class FakeClock:
    """A clock for tests: ``sleep`` advances its time at once; thread safe.

    Parameters
    ----------
    start : float
        Its time at creation, in seconds since the epoch.
    """

    def __init__(self, start: float) -> None:
        self._now = float(start)
        self._lock = threading.Lock()
        #: Every sleep asked for, in order.
        self.sleeps: list[float] = []

    def time(self) -> float:
        with self._lock:
            return self._now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.sleeps.append(seconds)
            if seconds > 0:
                self._now += seconds

    def advance(self, seconds: float) -> None:
        """Move time forward without counting it as a sleep."""
        with self._lock:
            self._now += seconds


_HHMM = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)$")


@dataclass(frozen=True)
class Window:
    """A daily time window in local time, e.g. ``19:00-07:00`` (across midnight).

    ``start == end`` means all day.
    """

    start: dt.time
    end: dt.time

    @classmethod
    def parse(cls, text: str) -> Window:
        """``HH:MM-HH:MM``.

        Raises
        ------
        ValueError
            Naming what is wrong.
        """
        parts = text.split("-")
        if len(parts) != 2:
            raise ValueError(f"window {text!r}: expected HH:MM-HH:MM, e.g. 19:00-07:00")
        times = []
        for part in parts:
            m = _HHMM.match(part.strip())
            if not m:
                raise ValueError(f"window {text!r}: {part.strip()!r} is not a time HH:MM")
            times.append(dt.time(int(m.group(1)), int(m.group(2))))
        return cls(times[0], times[1])

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"

    def contains(self, when: dt.datetime) -> bool:
        """Whether the local time ``when`` is inside the window."""
        t = when.time()
        if self.start == self.end:
            return True
        if self.start < self.end:
            return self.start <= t < self.end
        return t >= self.start or t < self.end

    def next_open(self, when: dt.datetime) -> dt.datetime:
        """The first moment at or after ``when`` that is inside the window."""
        if self.contains(when):
            return when
        today = when.replace(hour=self.start.hour, minute=self.start.minute, second=0, microsecond=0)
        return today if today > when else today + dt.timedelta(days=1)

    def closes_at(self, when: dt.datetime) -> dt.datetime:
        """When the window that holds ``when`` closes (``when`` must be inside it)."""
        end = when.replace(hour=self.end.hour, minute=self.end.minute, second=0, microsecond=0)
        return end if end > when else end + dt.timedelta(days=1)


def local(clock: Clock) -> dt.datetime:
    """The clock's time as a naive local datetime."""
    return dt.datetime.fromtimestamp(clock.time())


class RateLimiter:
    """A byte budget per second (token bucket), shared by every transfer.

    ``take(n)`` returns once the ``n`` bytes fit the budget, sleeping on the
    clock as long as needed. Up to one second of budget may be spent at once
    (the bucket), so short bursts go at line speed while the average holds.

    Parameters
    ----------
    bytes_per_s : float or None
        The cap; ``None`` or 0: no cap.
    clock : Clock
        Where it reads the time and sleeps.
    burst_s : float
        Seconds of budget the bucket holds.
    """

    def __init__(self, bytes_per_s: float | None, clock: Clock, burst_s: float = 1.0) -> None:
        if bytes_per_s is not None and bytes_per_s < 0:
            raise ValueError('Argument "bytes_per_s" must be positive or None.')
        self.rate = float(bytes_per_s) if bytes_per_s else 0.0
        self.clock = clock
        self.capacity = self.rate * burst_s
        self._lock = threading.Lock()
        self._tokens = self.capacity
        self._last = clock.time()
        self._stopped = False

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def stop(self) -> None:
        """Let every waiting and future ``take`` return at once (the run is stopping)."""
        self._stopped = True

    def take(self, n: int) -> float:
        """Spend ``n`` bytes of budget; returns the seconds waited."""
        if not self.enabled or n <= 0:
            return 0.0
        with self._lock:
            # The debt is booked at once, under the lock, so that concurrent
            # transfers queue behind each other instead of each seeing the
            # same full bucket.
            now = self.clock.time()
            self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        # In steps, so that a stopping run is not held by a reader thread
        # asleep on a large debt.
        left = wait
        while left > 0 and not self._stopped:
            step = min(left, 0.25)
            self.clock.sleep(step)
            left -= step
        return wait


class Backoff:
    """One pause shared by every worker after the PACS says it is busy.

    After an "out of resources" answer, a rejected association or a
    timeout, nobody talks to the PACS until ``resume_at``; each further
    failure in a row doubles the pause (up to ``maximum_s``), the first
    success resets it.

    Parameters
    ----------
    initial_s, maximum_s : float
        The first pause and the longest.
    clock : Clock
    """

    def __init__(self, initial_s: float, maximum_s: float, clock: Clock) -> None:
        if initial_s < 0 or maximum_s < initial_s:
            raise ValueError('Arguments "initial_s" and "maximum_s" must satisfy 0 <= initial_s <= maximum_s.')
        self.initial_s = initial_s
        self.maximum_s = maximum_s
        self.clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self.resume_at = 0.0

    def failed(self) -> float:
        """Record a failure; returns the pause it starts."""
        with self._lock:
            pause = min(self.maximum_s, self.initial_s * (2 ** self._failures))
            self._failures += 1
            self.resume_at = max(self.resume_at, self.clock.time() + pause)
            return pause

    def succeeded(self) -> None:
        with self._lock:
            self._failures = 0

    def remaining(self) -> float:
        """Seconds until the PACS may be asked again (0: now)."""
        return max(0.0, self.resume_at - self.clock.time())
