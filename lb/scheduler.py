"""When health checks run: every distinct probe at its interval, jittered, from a heap of
due checks behind one loop timer (lb/health.py's Checker does the I/O).
bench/health.py measures it (python -m bench health).
"""

from __future__ import annotations

import asyncio
import heapq
import random
import resource
from typing import Awaitable, Callable, Optional

from .health import Checker, Probe, ProbeResult

Callback = Callable[[Probe, ProbeResult], Optional[Awaitable[None]]]
ErrorCallback = Callable[[Probe, BaseException], None]
FaultCallback = Callable[[Optional[str]], None]


def ensure_fd_budget(n: int) -> None:
    """Raise the soft open-files limit so n probes in flight (plus the daemon's own maps
    and sockets) cannot run out of descriptors under a 1024 default."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = n + 1024
    if soft != resource.RLIM_INFINITY and soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(hard, need)
        if new > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


class Scheduler:
    """Runs every distinct probe at its interval, each interval jittered by up to `jitter`
    (10%) either way, the first check of a new probe within `jitter` x interval.

    One loop timer serves a heap of due checks; checks due within a batch window of each
    other start together (at most BATCH_S early, and never more than a quarter of the
    smallest jitter): their sockets then become ready together and one wake-up of the
    loop serves several (a third less CPU at 1,000 checks/s). A probe's next check
    is planned when its current one ends, so a probe never overlaps itself.

    probes_run counts checks; lag_max is the largest delay (seconds) between when a check
    was due and when it started (an overloaded loop shows here); errors counts callbacks
    that raised (the checks go on)."""

    BATCH_S = 0.02

    def __init__(self, on_result: Callback, jitter: float = 0.1,
                 on_error: Optional[ErrorCallback] = None,
                 on_fault: Optional[FaultCallback] = None):
        self.on_result = on_result
        self.on_error = on_error
        # on_fault(reason) when checks stop being possible (ProbeResult.fault: such a
        # result is not passed on), on_fault(None) when they are again
        self.on_fault = on_fault
        self.fault: Optional[str] = None
        self.jitter = jitter
        self.intervals: dict[Probe, float] = {}
        self.lag_max = 0.0
        self.probes_run = 0
        self.errors = 0
        self.in_flight = 0
        self._token: dict[Probe, int] = {}  # current generation of each wanted probe
        self._due: list[tuple[float, int, Probe]] = []  # (due, token, probe)
        self._next_token = 0
        self._checker: Optional[Checker] = None
        self._timer: Optional[asyncio.TimerHandle] = None
        self._timer_at = 0.0
        self._tasks: set = set()
        self._batch = self.BATCH_S
        self._rand = random.random

    def configure(self, wanted: dict[Probe, float]) -> None:
        """wanted: probe -> interval (the smallest interval of the VIPs using it). Probes
        no longer wanted stop (a check in flight ends unreported). A probe whose interval
        changed starts over like a new one (its first check within jitter x interval),
        so a shorter interval does not wait out the longer one."""
        loop = asyncio.get_running_loop()
        if self._checker is None:
            self._checker = Checker(loop)
        for p in [p for p in self.intervals if p not in wanted]:
            del self.intervals[p]
            del self._token[p]
        ensure_fd_budget(len(wanted))
        now = loop.time()
        for p, interval in wanted.items():
            if interval <= 0:
                raise ValueError(f"interval of {p} must be positive")
            old = self.intervals.get(p)
            self.intervals[p] = interval
            if p not in self._token or old != interval:
                self._next_token += 1
                self._token[p] = self._next_token
                self._push(now + self._rand() * interval * self.jitter, p)
        if self.intervals:
            self._batch = min(self.BATCH_S, min(self.intervals.values()) * self.jitter / 4)

    def interval_after(self, interval: float) -> float:
        """Time from one check's due time to the next one's: interval +- jitter."""
        return interval * (1.0 + self.jitter * (2.0 * self._rand() - 1.0))

    def _push(self, due: float, p: Probe) -> None:
        heapq.heappush(self._due, (due, self._token[p], p))
        if self._timer is None or due < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = due
            self._timer = self._checker.loop.call_at(due, self._tick)

    def _tick(self) -> None:
        self._timer = None
        loop = self._checker.loop
        now = loop.time()
        due = self._due
        started = []
        horizon = now + self._batch
        while due and due[0][0] <= horizon:
            when, token, p = heapq.heappop(due)
            if self._token.get(p) != token:
                continue  # removed (or removed and added again) since
            lag = now - when
            if lag > self.lag_max:
                self.lag_max = lag
            started.append((when, token, p))
        for when, token, p in started:
            self.in_flight += 1
            self._checker.start(p, lambda r, w=when, t=token, p=p: self._done(p, t, w, r))
        while due and self._token.get(due[0][2]) != due[0][1]:
            heapq.heappop(due)
        # a check that failed at once (inside connect) planned its next run already and
        # may have armed the timer for it: the heap's head decides, not that check
        if due and (self._timer is None or due[0][0] < self._timer_at):
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = due[0][0]
            self._timer = loop.call_at(self._timer_at, self._tick)

    def _done(self, p: Probe, token: int, when: float, r: ProbeResult) -> None:
        self.in_flight -= 1
        if self._token.get(p) != token:
            return  # no longer wanted
        self.probes_run += 1
        if r.fault != (self.fault is not None):
            self.fault = r.reason if r.fault else None
            if self.on_fault is not None:
                try:
                    self.on_fault(self.fault)
                except Exception as e:  # the checks must go on
                    self._failed(p, e)
        try:
            res = None if r.fault else self.on_result(p, r)
            if asyncio.iscoroutine(res):
                t = self._checker.loop.create_task(res)
                self._tasks.add(t)
                t.add_done_callback(self._task_done(p))
        except Exception as e:  # the checks must go on
            self._failed(p, e)
        if self._token.get(p) != token:
            return  # the callback reconfigured
        nxt = when + self.interval_after(self.intervals[p])
        now = self._checker.loop.time()
        if nxt < now:  # this check overran the interval (a slow loop): next one now
            self.lag_max = max(self.lag_max, now - nxt)
            nxt = now
        self._push(nxt, p)

    def _task_done(self, p: Probe):
        def done(t: asyncio.Task) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                self._failed(p, t.exception())
        return done

    def _failed(self, p: Probe, e: BaseException) -> None:
        self.errors += 1
        if self.on_error is not None:
            try:
                self.on_error(p, e)
            except Exception:
                pass

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.intervals.clear()
        self._token.clear()
        self._due.clear()
        for t in self._tasks:
            t.cancel()
        if self._checker is not None:
            self._checker.close()
            self._checker = None
