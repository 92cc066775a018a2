"""The daemon's health bookkeeping: one `Verdict` per VIP/backend pair, the probes that
feed them (one probe serves every pair that checks the same thing), and the state flips
waiting for their map update.

Flips (and first verdicts, which complete a VIP's view for its announcement) are handed
to a callback together, HEALTH_BATCH_S after the first one (a switch
failing under a thousand backends costs a few ring swaps, not a thousand), and logged
once the callback has run: `backend_state_changed`, or `backend_health_changed` when an
admin state hides the health (a maint backend going down changes no state)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Optional

from . import policy
from .health import Probe, ProbeResult
from .scheduler import Scheduler


@dataclass
class Verdict:
    """Health of one VIP/backend pair: down until checked (no traffic), up after `rise`
    consecutive successes, down after `fall` consecutive failures."""

    rise: int
    fall: int
    up: bool = False
    checked: bool = False
    ok_run: int = 0
    fail_run: int = 0
    checks: int = 0          # results recorded
    transitions: int = 0
    last: Optional[ProbeResult] = None

    def record(self, r: ProbeResult) -> Optional[tuple[bool, bool]]:
        """Count a result; returns (was_up, is_up) when the state flips."""
        self.last, self.checked = r, True
        self.checks += 1
        if r.ok:
            self.ok_run, self.fail_run = self.ok_run + 1, 0
            if not self.up and self.ok_run >= self.rise:
                self.up = True
                self.transitions += 1
                return False, True
        else:
            self.fail_run, self.ok_run = self.fail_run + 1, 0
            if self.up and self.fail_run >= self.fall:
                self.up = False
                self.transitions += 1
                return True, False
        return None

    @property
    def run(self) -> int:
        """Consecutive results of the current kind (successes or failures)."""
        return self.ok_run or self.fail_run


HEALTH_BATCH_S = 0.05  # health flips gathered into one map update
RETRY_S = 1.0          # after a failed map update

Pair = tuple[str, str]  # (VIP name, backend address)


class HealthBook:
    def __init__(self, log, admin_of: Callable[[str, str], str],
                 apply_flips: Callable[[list[dict]], None]):
        """admin_of(vip, backend): the pair's admin state, for the states a flip moves
        between; apply_flips(events): push the current state to the maps (raises on
        failure: the update is tried again RETRY_S later)."""
        self.log, self.admin_of, self.apply_flips = log, admin_of, apply_flips
        self.verdicts: dict[Pair, Verdict] = {}
        self.probes: dict[Probe, list[Pair]] = {}
        # pairs an earlier instance left taking flows: up until their first verdict
        self.seed_up: set[Pair] = set()
        self.scheduler: Optional[Scheduler] = None
        self._pending: list[dict] = []  # events awaiting their map update
        self._first_verdict = False     # a pair had its first result since the last one
        self._flush: Optional[asyncio.TimerHandle] = None

    # --- what the policy and the views read ---------------------------------------
    def up(self, vip: str, backend: str) -> bool:
        """Health of a checked pair: its verdict, or the adopted seed before the first."""
        verdict = self.verdicts.get((vip, backend))
        if verdict is None:
            return (vip, backend) in self.seed_up
        return verdict.up

    def verdict(self, vip: str, backend: str) -> Optional[Verdict]:
        return self.verdicts.get((vip, backend))

    def first_round_done(self) -> bool:
        """Every checked pair has a result and the flips it caused are in the maps."""
        return (self.scheduler is not None and not self._pending
                and all(v.checks for v in self.verdicts.values()))

    def figures(self) -> Optional[dict]:
        """The scheduler's own counters; None before checks start."""
        s = self.scheduler
        if s is None:
            return None
        return {"probes": len(s.intervals), "checks_run": s.probes_run,
                "in_flight": s.in_flight, "max_lag_s": round(s.lag_max, 6),
                "callback_errors": s.errors}

    def seed(self, vips: Iterable, installed: Callable) -> None:
        """Backends an earlier instance left taking flows (installed(ident): what the
        maps hold for a VIP) count as up until their own checks say otherwise, so a
        restart does not empty the rings."""
        self.seed_up = {(v.name, str(b.address)) for v in vips
                        if (cur := installed(v.ident)) is not None
                        for b in v.backends if b.address in cur.flows_stay}

    # --- life ------------------------------------------------------------------------
    def start(self, vips: Iterable) -> None:
        """Start checking (in the running loop) the backends of vips (config VIPs)."""
        self.scheduler = Scheduler(self._on_probe, on_error=self._on_error,
                                   on_fault=self._on_fault)
        self.configure(vips)
        # adopted health seeds the first verdicts only: a backend a later reload adds
        # must pass its checks before it gets traffic, even one the old instance had up
        self.seed_up = set()

    def stop(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None

    def configure(self, vips: Iterable) -> None:
        """Probes and verdicts for vips; a pair that stays keeps its verdict (with the
        new rise/fall), one that goes loses it."""
        probes: dict[Probe, list[Pair]] = {}
        intervals: dict[Probe, float] = {}
        keep = set()
        for v in vips:
            h = v.health
            if h.type == "none":
                continue
            for b in v.backends:
                p = Probe(h.type, str(b.address), h.port or v.port, h.timeout,
                          getattr(h, "path", "/"), getattr(h, "expect_status", 200))
                key = (v.name, str(b.address))
                probes.setdefault(p, []).append(key)
                intervals[p] = min(intervals.get(p, h.interval), h.interval)
                keep.add(key)
                cur = self.verdicts.get(key)
                if cur is None:
                    self.verdicts[key] = Verdict(h.rise, h.fall, up=key in self.seed_up)
                else:
                    cur.rise, cur.fall = h.rise, h.fall
        for key in [k for k in self.verdicts if k not in keep]:
            del self.verdicts[key]
        self.probes = probes
        self.scheduler.configure(intervals)

    def checkpoint(self) -> tuple:
        """What configure() changes: verdicts, probes and their intervals (restore())."""
        intervals = dict(self.scheduler.intervals) if self.scheduler else None
        return ({k: replace(v) for k, v in self.verdicts.items()},
                {p: list(pairs) for p, pairs in self.probes.items()}, intervals)

    def restore(self, saved: tuple) -> None:
        """Back to a checkpoint() taken with no result recorded since (a rejected reload
        runs without awaiting): the same verdicts, probes and intervals; a probe the
        reload had dropped starts again within its jitter."""
        verdicts, probes, intervals = saved
        self.verdicts = {k: replace(v) for k, v in verdicts.items()}
        self.probes = {p: list(pairs) for p, pairs in probes.items()}
        if self.scheduler is not None and intervals is not None:
            self.scheduler.configure(intervals)

    # --- results -----------------------------------------------------------------------
    def _on_probe(self, p: Probe, r: ProbeResult) -> None:
        """A check's result, for every VIP/backend pair using that probe."""
        for k in self.probes.get(p, ()):
            v = self.verdicts.get(k)
            # a first verdict completes a VIP's view (announcements wait for it)
            self._first_verdict |= v is not None and not v.checks
            flip = v.record(r) if v is not None else None
            if flip:
                admin = self.admin_of(*k)
                self._pending.append({
                    "vip": k[0], "backend": k[1],
                    "from": policy.effective(admin, flip[0]).state,
                    "to": policy.effective(admin, flip[1]).state, "reason": r.reason,
                    "health": "up" if flip[1] else "down",
                    "consecutive": v.run, "check_count": v.checks})
        if (self._pending or self._first_verdict) and self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(HEALTH_BATCH_S,
                                                                self._flush_health)

    def _flush_health(self) -> None:
        self._flush = None
        events, self._pending, self._first_verdict = self._pending, [], False
        try:
            self.apply_flips(events)
        except Exception as e:  # keep checking; try the maps again shortly
            self.log.error("health_apply_failed", error=str(e))
            self._flush = asyncio.get_running_loop().call_later(RETRY_S, self._flush_health)
        for ev in events:
            same = ev["from"] == ev["to"]
            self.log.info("backend_health_changed" if same else "backend_state_changed", **ev)

    def _on_fault(self, reason: Optional[str]) -> None:
        """The checker itself cannot check (no descriptors...): verdicts stay as they
        are meanwhile; logged once each way."""
        if reason:
            self.log.error("health_checker_failing", error=reason,
                           effect="verdicts held until checks work again")
        else:
            self.log.info("health_checker_recovered")

    def _on_error(self, p: Probe, e: BaseException) -> None:
        self.log.error("health_callback_failed", backend=p.address, port=p.port,
                       error=f"{type(e).__name__}: {e}")
