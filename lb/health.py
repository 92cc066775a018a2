"""Health checks in the daemon's asyncio loop (no thread per backend).

A probe is identified by what it checks (type, address, port, path, status, timeout), so a
backend serving several VIPs with the same check is probed once per interval. Each
VIP/backend pair keeps its own rise/fall counters: it starts down (never checked = no
traffic), goes up after `rise` consecutive successes and down after `fall` failures.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Optional

READ_CAP = 4096  # bytes of an HTTP response we read at most


@dataclass(frozen=True)
class Probe:
    type: str            # tcp | http
    address: str
    port: int
    timeout: float
    path: str = "/"
    expect_status: int = 200


@dataclass
class ProbeResult:
    ok: bool
    reason: str
    latency_s: float
    at: float = field(default_factory=time.time)


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


async def run_probe(p: Probe) -> ProbeResult:
    t0 = time.perf_counter()
    writer = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(p.address, p.port),
                                                p.timeout)
        if p.type == "tcp":
            return ProbeResult(True, "connected", time.perf_counter() - t0)
        left = max(p.timeout - (time.perf_counter() - t0), 0.001)
        req = (f"GET {p.path} HTTP/1.0\r\nHost: {_host(p.address)}\r\n"
               f"User-Agent: xdplb-health\r\nConnection: close\r\n\r\n")
        writer.write(req.encode())
        line = await asyncio.wait_for(reader.readline(), left)
        parts = line[:READ_CAP].decode("latin-1").split()
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            return ProbeResult(False, "http: malformed status line", time.perf_counter() - t0)
        status = int(parts[1])
        ok = status == p.expect_status
        return ProbeResult(ok, f"http status {status}", time.perf_counter() - t0)
    except asyncio.TimeoutError:
        what = "connect" if writer is None else "http response"
        return ProbeResult(False, f"{what} timeout after {p.timeout}s", time.perf_counter() - t0)
    except ConnectionRefusedError:
        return ProbeResult(False, "connection refused", time.perf_counter() - t0)
    except OSError as e:
        return ProbeResult(False, e.strerror or str(e), time.perf_counter() - t0)
    finally:
        if writer is not None:
            writer.close()


@dataclass
class Verdict:
    """Health of one VIP/backend pair."""

    rise: int
    fall: int
    up: bool = False
    checked: bool = False
    ok_run: int = 0
    fail_run: int = 0
    last: Optional[ProbeResult] = None

    def record(self, r: ProbeResult) -> Optional[tuple[bool, bool]]:
        """Count a result; returns (was_up, is_up) when the state flips."""
        self.last, self.checked = r, True
        if r.ok:
            self.ok_run, self.fail_run = self.ok_run + 1, 0
            if not self.up and self.ok_run >= self.rise:
                self.up = True
                return False, True
        else:
            self.fail_run, self.ok_run = self.fail_run + 1, 0
            if self.up and self.fail_run >= self.fall:
                self.up = False
                return True, False
        return None


Callback = Callable[[Probe, ProbeResult], Awaitable[None] | None]


class Scheduler:
    """Runs one task per distinct probe at its interval, jittered by up to 10%."""

    def __init__(self, on_result: Callback, jitter: float = 0.1):
        self.on_result = on_result
        self.jitter = jitter
        self.tasks: dict[Probe, asyncio.Task] = {}
        self.intervals: dict[Probe, float] = {}
        self.lag_max = 0.0
        self.probes_run = 0

    def configure(self, wanted: dict[Probe, float]) -> None:
        """wanted: probe -> interval (the smallest interval of the VIPs using it)."""
        for p in [p for p in self.tasks if p not in wanted]:
            self.tasks.pop(p).cancel()
            self.intervals.pop(p, None)
        for p, interval in wanted.items():
            old = self.intervals.get(p)
            self.intervals[p] = interval
            if p not in self.tasks or old != interval:
                if p in self.tasks:
                    self.tasks[p].cancel()
                self.tasks[p] = asyncio.get_running_loop().create_task(self._loop(p))

    async def _loop(self, p: Probe) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(random.uniform(0, self.intervals[p] * self.jitter))
        while True:
            interval = self.intervals[p]
            due = loop.time()
            r = await run_probe(p)
            self.probes_run += 1
            res = self.on_result(p, r)
            if asyncio.iscoroutine(res):
                await res
            nxt = due + interval * random.uniform(1 - self.jitter, 1 + self.jitter)
            delay = nxt - loop.time()
            if delay < 0:
                self.lag_max = max(self.lag_max, -delay)
            await asyncio.sleep(max(delay, 0))

    def stop(self) -> None:
        for t in self.tasks.values():
            t.cancel()
        self.tasks.clear()
