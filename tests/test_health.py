"""Health checks against real servers in a namespace this file makes (xh-unit): run_probe,
Verdict and Scheduler against real TCP/HTTP servers: healthy, refusing, answering 500,
accepting and never answering, flapping, redirecting, babbling, closing; and a
black-holed address (connect timeout). The daemon's side, in a lab: test_health_lab.py.

Times here are generous timeouts only; what is asserted is counts and contents.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from lb import health
from lb import healthstate
from lb import scheduler
from lb.lab import namespaces, netns

from healthserver import HealthServer

UNIT_NS = "xh-unit"
RING = 1009


# --- probes, verdicts, the scheduler ------------------------------------------------------

BLACKHOLE = "10.77.0.2"  # on-link, nobody answers ARP: a connect never completes

PORTS = {"ok": 18001, "500": 18002, "hang": 18003, "flap": 18004, "redirect": 18005,
         "garbage": 18006, "close": 18007, "refused": 18009, "ok6": 18001}


@pytest.fixture(scope="module")
def unit():
    namespaces.remove(UNIT_NS)
    ns = netns.Netns(UNIT_NS, owned=False)
    servers = {}
    try:
        ns.set_link("lo", up=True)
        netns.add_veth("hb0", ns, "hb1", ns)
        ns.add_address("hb0", "10.77.0.1/24")
        for name, mode in (("ok", 200), ("500", 500), ("hang", "hang"), ("flap", 200),
                           ("redirect", "redirect"), ("garbage", "garbage"),
                           ("close", "close")):
            servers[name] = HealthServer(UNIT_NS, "127.0.0.1", PORTS[name], mode)
        servers["ok6"] = HealthServer(UNIT_NS, "::1", PORTS["ok6"], 200)
        yield servers
    finally:
        for s in servers.values():
            s.close()
        namespaces.remove(UNIT_NS)


def in_ns(coro):
    """Run a coroutine on a fresh loop with this thread in the unit namespace (its sockets
    are created there)."""
    with namespaces.entered(UNIT_NS):
        return asyncio.run(coro)


def probe(kind: str, target: str, timeout: float = 0.3, **kw) -> health.Probe:
    addr = "::1" if target == "ok6" else (BLACKHOLE if target == "blackhole" else "127.0.0.1")
    port = 80 if target == "blackhole" else PORTS[target]
    return health.Probe(kind, addr, port, timeout, kw.pop("path", "/healthz"), **kw)


@pytest.mark.parametrize("kind,target,ok,reason", [
    ("http", "ok", True, "http status 200"),
    ("http", "ok6", True, "http status 200"),
    ("http", "500", False, "http status 500"),
    ("http", "refused", False, "connection refused"),
    ("http", "hang", False, "http response timeout after 0.3s"),
    ("http", "blackhole", False, "connect timeout after 0.3s"),
    ("http", "redirect", False, "http status 301"),
    ("http", "garbage", False, f"http: no status line in the first {health.READ_CAP} bytes"),
    ("http", "close", False, "http: connection closed without a response"),
    ("tcp", "ok", True, "connected"),
    ("tcp", "hang", True, "connected"),  # a tcp check only needs the connect
    ("tcp", "refused", False, "connection refused"),
    ("tcp", "blackhole", False, "connect timeout after 0.3s"),
])
def test_probe_results(unit, kind, target, ok, reason):
    r = in_ns(health.run_probe(probe(kind, target)))
    assert (r.ok, r.reason) == (ok, reason)
    assert 0 <= r.latency_s < 5


def test_http_probe_request_and_read_cap(unit):
    """GET path to the backend's own address and the health port; redirects are not
    followed; at most READ_CAP bytes are read of an endless answer."""
    red = unit["redirect"]
    n0 = red.count()
    r = in_ns(health.run_probe(probe("http", "redirect", path="/status/x?y=1")))
    assert r.reason == "http status 301" and red.count() == n0 + 1  # no second request
    req = red.requests[-1].decode()
    assert req.startswith("GET /status/x?y=1 HTTP/1.0\r\n")
    assert f"\r\nHost: 127.0.0.1:{PORTS['redirect']}\r\n" in req
    r = in_ns(health.run_probe(probe("http", "500", expect_status=500)))
    assert r.ok and r.reason == "http status 500"
    r6 = unit["ok6"]
    in_ns(health.run_probe(probe("http", "ok6")))
    assert f"\r\nHost: [::1]:{PORTS['ok6']}\r\n" in r6.requests[-1].decode()


def test_probe_identity():
    """One probe per distinct check: a tcp check ignores path/status, so VIPs that differ
    only there share it; any difference in what is checked makes another probe."""
    a = health.Probe("tcp", "10.0.0.1", 80, 1.0, "/a", 500)
    b = health.Probe("tcp", "10.0.0.1", 80, 1.0)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert len({health.Probe("http", "10.0.0.1", 80, 1.0, "/a"),
                health.Probe("http", "10.0.0.1", 80, 1.0, "/b"),
                health.Probe("http", "10.0.0.1", 81, 1.0, "/a"),
                health.Probe("http", "10.0.0.2", 80, 1.0, "/a")}) == 4
    with pytest.raises(ValueError):
        health.Probe("ping", "10.0.0.1", 80, 1.0)


def _simulate(rise: int, fall: int, oks: list[bool], up: bool = False):
    """(check number, new state) of each flip a Verdict reports for the results `oks`."""
    v = healthstate.Verdict(rise, fall, up=up)
    out = []
    for i, ok in enumerate(oks, start=1):
        flip = v.record(health.ProbeResult(ok, "x", 0.0))
        if flip:
            assert flip[0] != flip[1]
            out.append((i, "up" if flip[1] else "down"))
    return out, v


def test_verdict_rise_fall():
    T, F = True, False
    # starts down: failures change nothing, `rise` consecutive successes bring it up
    flips, v = _simulate(2, 3, [F, F, F, F])
    assert flips == [] and not v.up and v.fail_run == 4
    assert _simulate(2, 3, [T, T])[0] == [(2, "up")]
    assert _simulate(3, 2, [T, T, F, T, T, T])[0] == [(6, "up")]  # a failure resets rise
    # up: `fall` consecutive failures bring it down; a success in between resets
    assert _simulate(2, 3, [T, T, F, F, T, F, F, F])[0] == [(2, "up"), (8, "down")]
    assert _simulate(1, 1, [T, F, T, F])[0] == [(1, "up"), (2, "down"), (3, "up"),
                                                 (4, "down")]
    assert _simulate(2, 2, [F, F], up=True)[0] == [(2, "down")]  # seeded up (adopted)
    _, v = _simulate(2, 3, [T, T, F])
    assert v.up and v.checked and v.checks == 3 and v.fail_run == 1 and v.run == 1
    assert healthstate.Verdict(2, 3).checked is False  # never checked: down, no traffic


def test_scheduler_transitions_against_servers(unit):
    """Five backends in one loop: healthy, refusing, 500, never answering, flapping. Each
    transition happens at exactly the check the rise/fall counts say, and every check is
    one request on the server."""
    rise, fall, interval, timeout = 2, 3, 0.1, 0.08
    flap = unit["flap"]
    # flapping script (1 = 200, 0 = 500): up at check 5, down at 13, up at 17
    script = [0, 1, 0, 1, 1, 0, 1, 0, 0, 1, 0, 0, 0, 1, 0, 1, 1]
    n_flap0 = flap.set_mode(200, [200 if s else 500 for s in script])
    targets = {"ok": "ok", "refused": "refused", "500": "500", "hang": "hang",
               "flap": "flap"}
    probes = {name: probe("http", t, timeout=timeout) for name, t in targets.items()}
    by_probe = {p: name for name, p in probes.items()}
    seen = {name: [] for name in probes}
    flips = {name: [] for name in probes}
    verdicts = {name: healthstate.Verdict(rise, fall) for name in probes}
    counts0 = {name: unit[t].count() for name, t in targets.items() if t in unit}

    async def main():
        done = asyncio.Event()

        def cb(p, r):
            name = by_probe[p]
            seen[name].append(r)
            flip = verdicts[name].record(r)
            if flip:
                flips[name].append((verdicts[name].checks, "up" if flip[1] else "down"))
            if all(len(v) >= len(script) for v in seen.values()):
                done.set()

        sched = scheduler.Scheduler(cb)
        sched.configure({p: interval for p in probes.values()})
        assert len(sched.intervals) == 5
        await asyncio.wait_for(done.wait(), 30)
        sched.stop()
        return sched

    sched = in_ns(main())
    assert sched.errors == 0 and sched.probes_run >= 5 * len(script)
    assert sched.lag_max < interval  # generous: nothing blocked the loop for an interval
    n = len(script)
    assert flips["ok"][:1] == [(rise, "up")] and len(flips["ok"]) == 1
    for name, reason in (("refused", "connection refused"), ("500", "http status 500"),
                         ("hang", f"http response timeout after {timeout}s")):
        assert flips[name] == [], name  # never up, so never a transition
        assert {r.reason for r in seen[name]} == {reason}
    assert flips["flap"][:3] == [(5, "up"), (13, "down"), (17, "up")]
    # every result one request, in order: the server's answers are the results seen
    given = flap.given[n_flap0:n_flap0 + n]
    assert [r.reason for r in seen["flap"][:n]] == [f"http status {g}" for g in given]
    for name in ("ok", "500", "hang"):
        got = unit[targets[name]].count() - counts0[name]
        assert len(seen[name]) <= got <= len(seen[name]) + 1  # + one in flight at stop


def test_scheduler_jitter_and_spread():
    """First checks spread over the first 10% of the interval; each next one 90-110% of the
    interval after the previous one was due (planned times, read from the heap)."""
    async def main():
        s = scheduler.Scheduler(lambda p, r: None)
        ps = {health.Probe("tcp", f"127.0.1.{i}", 9, 0.5): 10.0 for i in range(1, 201)}
        t0 = asyncio.get_running_loop().time()
        s.configure(ps)
        offsets = sorted(due - t0 for due, _, _ in s._due)
        s.stop()
        return offsets
    offsets = asyncio.run(main())
    assert len(offsets) == 200 and 0 <= offsets[0] and offsets[-1] <= 1.0 + 0.01
    assert offsets[-1] - offsets[0] > 0.5  # spread, not all at once
    s = scheduler.Scheduler(lambda p, r: None)
    gaps = [s.interval_after(2.0) for _ in range(2000)]
    assert 1.8 <= min(gaps) < 1.85 and 2.15 < max(gaps) <= 2.2


def test_scheduler_survives_callback_errors_and_reconfigures(unit):
    """A callback that raises does not stop the checks; a probe no longer wanted stops; a
    probe added later starts."""
    errors = []
    results: dict[str, int] = {"ok": 0, "500": 0}

    async def main():
        p_ok, p_500 = probe("tcp", "ok"), probe("http", "500")
        name = {p_ok: "ok", p_500: "500"}
        phase = {"n": 0}

        def cb(p, r):
            results[name[p]] += 1
            if name[p] == "ok" and results["ok"] % 2:
                raise RuntimeError("boom")

        s = scheduler.Scheduler(cb, on_error=lambda p, e: errors.append((p, str(e))))
        s.configure({p_ok: 0.05})
        while results["ok"] < 6:
            await asyncio.sleep(0.02)
        s.configure({p_500: 0.05})  # p_ok no longer wanted
        frozen = results["ok"]
        while results["500"] < 4:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        phase["n"] = results["ok"] - frozen
        s.stop()
        return s, phase["n"]
    s, after_removal = in_ns(main())
    assert after_removal <= 1  # at most the check in flight when it was removed
    assert s.errors == len(errors) >= 3 and errors[0][1] == "boom"
    assert results["500"] >= 4


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_moved_flow_stays_moved_on_every_cpu():
    """maint moves a flow; after `activate` the flow must stay where it was moved, on
    every CPU (else one connection is split between two backends)."""
    from packets import A, UDP_P, LbEnv, be, fast_frame, outer_dst
    from lb.specs import VipSpec

    vip = A("192.0.2.100")
    cpus = sorted(os.sched_getaffinity(0))[:2]
    keep = os.sched_getaffinity(0)
    env = LbEnv()

    def spec(first_state):
        return VipSpec(vip, 53, UDP_P, (be("10.0.0.1", state=first_state),
                                        be("10.0.0.2")), ring_size=RING)

    def send(cpu, sport):
        os.sched_setaffinity(0, {cpu})
        r = env.run(fast_frame(UDP_P, A("198.51.100.7"), sport, vip, 53))
        return str(outer_dst(r.data)) if r.verdict == "tx" else r.verdict
    try:
        env.apply([spec("active")])
        sport = next(p for p in range(1000, 3000) if send(cpus[0], p) == "10.0.0.1")
        env.apply([spec("maint")])
        assert send(cpus[1], sport) == "10.0.0.2"  # moved (the table says so)
        env.apply([spec("active")])
        assert [send(c, sport) for c in (cpus[1], cpus[0])] == ["10.0.0.2", "10.0.0.2"]
    finally:
        os.sched_setaffinity(0, keep)
        env.close()
