"""HealthBook without a daemon: one probe feeds every pair that checks the same thing,
flips reach the maps in one batch and are logged once they are in (a state change, or a
health change an admin maint hides), a failed map update is tried again."""

from __future__ import annotations

import asyncio
import ipaddress
from types import SimpleNamespace as NS

from lb import healthstate
from lb.health import Probe, ProbeResult


class Log:
    def __init__(self, applied: list):
        self.events, self.applied = [], applied

    def info(self, event, **kw):
        self.events.append((event, kw, len(self.applied)))  # map updates made by then

    error = warning = info


def vip(name: str, *backends: str):
    # interval long enough that no real check starts while the test runs
    health = NS(type="tcp", port=0, timeout=1.0, interval=1000.0, rise=1, fall=1)
    return NS(name=name, port=80, health=health,
              backends=[NS(address=ipaddress.ip_address(b)) for b in backends])


async def until(cond) -> None:
    for _ in range(1000):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never met")


def test_flips_batched_logged_and_retried(monkeypatch):
    monkeypatch.setattr(healthstate, "RETRY_S", 0.05)
    applied, admin = [], {}
    log = Log(applied)
    fail = []

    def apply_flips(events):
        applied.append([(e["vip"], e["backend"]) for e in events])
        if fail:
            fail.pop()
            raise RuntimeError("maps busy")

    book = healthstate.HealthBook(log, lambda v, b: admin.get((v, b), "active"), apply_flips)
    vips = [vip("a", "10.0.0.1"), vip("b", "10.0.0.1", "10.0.0.2")]
    probe = Probe("tcp", "10.0.0.1", 80, 1.0)

    async def main():
        book.start(vips)
        try:
            assert len(book.scheduler.intervals) == 2  # one probe for both pairs of .1
            assert not book.up("a", "10.0.0.1")
            book.scheduler.on_result(probe, ProbeResult(True, "connected", 0.001))
            book.scheduler.on_result(Probe("tcp", "10.0.0.2", 80, 1.0),
                                     ProbeResult(True, "connected", 0.001))
            assert book.up("a", "10.0.0.1") and book.up("b", "10.0.0.1")
            assert applied == []  # not yet: gathered for HEALTH_BATCH_S
            await until(lambda: len(log.events) == 3)
            assert applied == [[("a", "10.0.0.1"), ("b", "10.0.0.1"), ("b", "10.0.0.2")]]
            assert [n for _, _, n in log.events] == [1, 1, 1]  # logged once in the maps
            changed = [kw for ev, kw, _ in log.events if ev == "backend_state_changed"]
            assert [(e["vip"], e["from"], e["to"], e["health"]) for e in changed[:2]] == \
                [("a", "down", "active", "up"), ("b", "down", "active", "up")]
            assert changed[0]["check_count"] == 1 and changed[0]["reason"] == "connected"

            log.events.clear()
            admin[("a", "10.0.0.1")] = "maint"
            fail.append(1)
            book.scheduler.on_result(probe, ProbeResult(False, "connection refused", 0.001))
            await until(lambda: len(applied) == 3)
            assert [(ev, n) for ev, _, n in log.events] == [
                ("health_apply_failed", 2), ("backend_health_changed", 2),
                ("backend_state_changed", 2)]
            hidden = log.events[1][1]
            assert (hidden["from"], hidden["to"], hidden["health"]) == ("maint", "maint", "down")
            assert applied[1] == [("a", "10.0.0.1"), ("b", "10.0.0.1")]
            assert applied[2] == []  # the retry pushes the state again, with no new flips
        finally:
            book.stop()
        assert book.figures()["probes"] == 0  # stopped

    asyncio.run(main())
