"""A reload that fails partway through its map writes is rolled back: the maps, rings,
health targets and stats after it are those before it, and one `config_rejected` line
names the cause.

The daemon runs in this process on a real data path (loaded, not attached): real maps,
real health scheduler (no check is due during the test: nothing is sent). Two failures:
the kernel refusing a write (quic_servers full while a QUIC VIP's old and new server IDs
are held side by side, which no config check sees), and one of our own writing steps
raising once the rest of the plan (rings, VIP entries and addresses, QUIC deletes,
demotions, backend removals with their counters moved) has landed."""

from __future__ import annotations

import asyncio
import ctypes
import ipaddress
import random

import pytest

import lb.reload
from lb import daemon, native
from lb.config import load_config
from lb.datapath import MAP_NAMES, Datapath, EgressConfig, Limits
from lb.nexthop import Nexthops
from lb.planwriter import PlanWriter
from lb.programmer import Programmer

from packets import pkt
from test_reload import Log

QUIC = 7  # backends of the QUIC VIP


def config(state_file, sids=range(1, QUIC + 1), *, new: bool = False) -> str:
    """max_backends 13 leaves ids for the old pairs (11) and the one the new file adds,
    while both side by side; quic_servers has 13 entries."""
    web = (('"127.0.1.11"', 3, "active"), ('"127.0.1.12"', 1, "maint")) if new else \
        tuple((f'"127.0.1.{i}"', 1, "active") for i in (11, 12, 13))
    text = f"""
[lb]
interface = "lo"
state_file = "{state_file}"
ring_size = 1009
max_vips = 8
max_backends = 13
flow_table_size = 256
flow_insert_limit = {2000 if new else 1000}

[health]
type = "tcp"
port = 1
interval = {1800.0 if new else 3600.0}

[[vip]]
name = "web"
address = "192.0.2.10"
port = 80
protocol = "tcp"
[vip.health]
type = "none"
""" + "".join(f"[[vip.backend]]\naddress = {a}\nweight = {w}\nstate = \"{s}\"\n"
              for a, w, s in web)
    second = ("fresh", "192.0.2.12", 8080, "tcp", "") if new else \
        ("gone", "192.0.2.11", 5353, "udp", '[vip.health]\ntype = "none"\n')
    text += (f'[[vip]]\nname = "{second[0]}"\naddress = "{second[1]}"\nport = {second[2]}\n'
             f'protocol = "{second[3]}"\n{second[4]}[[vip.backend]]\naddress = "127.0.1.41"\n')
    text += '[[vip]]\nname = "h3"\naddress = "192.0.2.10"\nport = 443\nprotocol = "udp"\n' \
            'quic = true\n'
    for i, sid in zip(range(31, 31 + QUIC), sids):
        text += f'[[vip.backend]]\naddress = "127.0.1.{i}"\nserver_id = {sid}\n'
    return text


def resolved(cfg) -> Nexthops:
    """Every backend its own next hop; the MACs of a reloaded file differ."""
    salt = cfg.lb.flow_insert_limit // 1000
    addrs = {str(b.address) for v in cfg.vips for b in v.backends}
    return Nexthops(macs={a: bytes([2, salt, 0, 0, 0, int(a.split(".")[-1])]) for a in addrs},
                    keys={a: a for a in addrs})


def maps(dp: Datapath) -> dict:
    """Every map's contents; rings by what they hold (a rewritten ring is a new inner
    map). The QUIC epoch is left out: any change of quic_servers bumps it; so are the
    seqs of vip_index's slots (every write of a slot bumps its seq)."""
    out = {name: dict(dp.maps[name].items()) for name in MAP_NAMES
           if name not in ("rings", "quic_epoch", "vip_index")}
    out["vip_index"] = {slot: v[4:] for slot, v in dp.maps["vip_index"].items() if any(v[4:])}
    out["rings"] = {slot: list(dp.read_ring(slot))
                    for slot in range(1, dp.maps["rings"].max_entries)
                    if dp.read_ring(slot) is not None}
    return out


def health(d: daemon.Daemon) -> tuple:
    return ({k: (v.rise, v.fall, v.up) for k, v in d.health.verdicts.items()},
            {p: sorted(pairs) for p, pairs in d.health.probes.items()},
            dict(d.health.scheduler.intervals))


def send(dp: Datapath, n: int) -> None:
    """Traffic to every VIP, so backends and VIPs have counts (and flows) to keep."""
    for i in range(n):
        for dst, port, proto in (("192.0.2.10", 80, "tcp"), ("192.0.2.11", 5353, "udp"),
                                 ("192.0.2.10", 443, "udp")):
            native.test_run(dp.prog_fd, pkt(proto, "198.51.100.7", dst, 40000 + i, port))


def fail_releases(monkeypatch) -> str:
    """Our last writing step (releasing a removed VIP) raises, after everything else."""
    def broken(self, cur):
        raise RuntimeError("releasing a VIP failed (injected)")
    monkeypatch.setattr(PlanWriter, "_release_vip", broken)
    return "releasing a VIP failed (injected)"


def fail_after_release(monkeypatch) -> str:
    """That step raises once it has released the VIP (its ring and backend entries)."""
    real = PlanWriter._release_vip

    def broken(self, cur):
        real(self, cur)
        raise RuntimeError("after releasing a VIP (injected)")
    monkeypatch.setattr(PlanWriter, "_release_vip", broken)
    return "after releasing a VIP (injected)"


CASES = {
    # the kernel refuses: E2BIG once 13 entries are in (7 old server IDs, 6 new)
    "quic_servers_full": (range(11, 11 + QUIC), lambda monkeypatch: "quic_servers is full"),
    # two server IDs change (9 entries at most); the failure is ours, at the very end
    "last_step_fails": ((1, 2, 3, 4, 5, 11, 12), fail_releases),
    # the same, once the removed VIP's ring is gone (the rollback installs it again)
    "released_then_fails": ((1, 2, 3, 4, 5, 11, 12), fail_after_release),
}


def started(tmp_path, monkeypatch, resolve=resolved) -> daemon.Daemon:
    """The daemon on the old file (not applied yet); its next hops from `resolve`."""
    path = tmp_path / "lb.toml"
    path.write_text(config(tmp_path / "state.json"))
    cfg = load_config(str(path))
    d = daemon.Daemon(str(path), cfg, Log())
    d.dp = Datapath(Limits(max_vips=cfg.lb.max_vips, max_backends=cfg.lb.max_backends,
                           flow_table_size=cfg.lb.flow_table_size))
    d.programmer = Programmer(d.dp, keep_rings=False)
    monkeypatch.setattr(d, "resolve", lambda cfg, nl=None, settle=False: resolve(cfg))
    monkeypatch.setattr(lb.reload, "egress_config", lambda cfg, eg, ingress: EgressConfig(
        source_v4=ipaddress.ip_address("10.0.0.2"), flow_insert_limit=cfg.lb.flow_insert_limit))
    monkeypatch.setattr(random, "random", lambda: 1.0)  # first checks 360 s away
    d.egress_cfg = lb.reload.egress_config(cfg, None, None)
    return d


def reload_failing(d: daemon.Daemon, tmp_path, monkeypatch, case: str,
                   watch=lambda: None) -> tuple:
    """The old file applied, with counts (then `watch()`), and a reload to the new file
    that fails as CASES[case] says: (maps, stats, health, states) before and after,
    and the cause it fails by."""
    sids, arm = CASES[case]

    async def run():
        d._reload_lock = asyncio.Lock()
        d.health.start(d.cfg.vips)
        try:
            d.apply(d.resolve(d.cfg))
            send(d.dp, 20)
            watch()
            before = (maps(d.dp), d.stats(), health(d), dict(d.applied))
            assert before[1]["vips"][1]["packets"] and before[1]["vips"][0]["backends"][2][
                "packets"], "no counts to keep"
            cause = arm(monkeypatch)
            (tmp_path / "lb.toml").write_text(config(tmp_path / "state.json", sids, new=True))
            await d.reload_async()
            return before, (maps(d.dp), d.stats(), health(d), dict(d.applied)), cause
        finally:
            d.health.stop()
    return asyncio.run(run())


@pytest.mark.parametrize("case", CASES)
def test_reload_failing_partway_leaves_everything_as_it_was(tmp_path, monkeypatch, case):
    d = started(tmp_path, monkeypatch)
    cfg, log = d.cfg, d.log
    try:
        before, after, cause = reload_failing(d, tmp_path, monkeypatch, case)
        assert [(lvl, ev) for lvl, ev, _ in log.lines] == [("error", "config_rejected")]
        assert cause in log.lines[0][2]["error"]
        assert d.cfg is cfg
        for name in before[0]:
            assert after[0][name] == before[0][name], f"map {name} differs after the reload"
        for name, b, a in zip(("stats", "health targets", "states"), before[1:], after[1:]):
            assert a == b, f"{name} differ after the rejected reload: {_diff(b, a)}"
        # the records agree with the maps: the old config again changes nothing
        specs, _ = d.desired()
        rep = d.programmer.apply(specs, d.nexthops.macs, egress=d.egress_cfg)
        assert (rep.rings_swapped, rep.backends_added, rep.vips_added) == (0, 0, 0)
        assert maps(d.dp) == after[0]
    finally:
        d.dp.close()


GATEWAY = "192.0.2.254%9"  # the reloaded file's own next hop for 127.0.1.41


def half_resolved(cfg) -> Nexthops:
    """As resolved(), but under the old file 127.0.1.12's neighbour has not answered
    yet (no MAC: its packets are dropped), and the reloaded one has its MAC and reaches
    127.0.1.41 by a gateway no next hop had before (a new next-hop id)."""
    hops = resolved(cfg)
    macs, keys = dict(hops.macs), dict(hops.keys)
    if cfg.lb.flow_insert_limit == 1000:  # the old file
        del macs["127.0.1.12"]
    else:
        keys["127.0.1.41"], macs[GATEWAY] = GATEWAY, bytes([2, 9, 0, 0, 0, 254])
    return Nexthops(macs, keys)


@pytest.mark.parametrize("case", CASES)
def test_rollback_puts_back_every_mac_the_failed_reload_wrote(tmp_path, monkeypatch, case):
    """A MAC the old config lacks (unresolved, or an id the failed file took) is not left
    behind: packets to 127.0.1.12 stay dropped as its stats say (`unresolved`), and no
    id holds a MAC no next hop of the records knows."""
    d = started(tmp_path, monkeypatch, resolve=half_resolved)
    ids, written = {}, []
    real_set = d.dp.set_nexthop
    monkeypatch.setattr(d.dp, "set_nexthop", lambda nid, mac: (written.append((nid, mac)),
                                                               real_set(nid, mac))[1])
    try:
        before, after, _ = reload_failing(d, tmp_path, monkeypatch, case,
                                          watch=lambda: ids.update(d.programmer.nexthops))
        # what the failed reload wrote: .12's id resolved, and a new id for the gateway
        assert (ids["127.0.1.12"], bytes([2, 2, 0, 0, 0, 12])) in written
        new_ids = {nid for nid, mac in written if mac == bytes([2, 9, 0, 0, 0, 254])}
        assert new_ids and not new_ids & set(ids.values())
        assert after[0]["nexthops"] == before[0]["nexthops"]
        assert d.dp.nexthop_mac(ids["127.0.1.12"]) == bytes(6)
        assert dict(d.programmer.nexthops) == ids
        web = after[1]["vips"][0]["backends"]
        assert [b["nexthop"] for b in web] == ["resolved", "unresolved", "resolved"]
        # the records agree with the map: the old config again writes no MAC, and the
        # neighbour answering later is written as on any refresh
        specs, _ = d.desired()
        del written[:]
        d.programmer.apply(specs, d.nexthops.macs, egress=d.egress_cfg)
        assert maps(d.dp)["nexthops"] == before[0]["nexthops"] and not written
        d.apply(resolved(d.cfg))
        assert d.dp.nexthop_mac(ids["127.0.1.12"]) == bytes([2, 1, 0, 0, 0, 12])
    finally:
        d.dp.close()


def inner_maps(dp: Datapath) -> dict:
    """Ring slot -> id of the inner map in it (a ring swapped in is a new inner map)."""
    raw = {slot: dp.maps["rings"].lookup(ctypes.c_uint32(slot))
           for slot in range(1, dp.maps["rings"].max_entries)}
    return {slot: ctypes.c_uint32.from_buffer_copy(r).value for slot, r in raw.items() if r}


@pytest.mark.parametrize("case", CASES)
def test_rollback_rewrites_only_the_rings_the_failed_reload_touched(tmp_path, monkeypatch,
                                                                     case):
    """Each ring swapped costs an RCU grace period: the rollback swaps back web's (the
    failed file changed its weights) and gone's if the failed apply removed it, not the
    others, which keep their inner maps."""
    d = started(tmp_path, monkeypatch)
    installs, phase, slot, inner = [], ["start"], {}, {}
    real_install, real_rollback = d.dp.install_rings, d.programmer.rollback

    def install_rings(rings, chunk=256):
        installs.extend((phase[0], ring_id) for ring_id, _ in rings)
        real_install(rings, chunk)

    def rollback(cp):
        phase[0] = "rollback"
        real_rollback(cp)

    def watch():  # the old file's rings: slot of each VIP (by port), inner map of each
        slot.update((s.ident[1], d.programmer.installed(s.ident).ring_id)
                    for s in d.desired()[0])
        inner.update(inner_maps(d.dp))
        phase[0] = "reload"
    monkeypatch.setattr(d.dp, "install_rings", install_rings)
    monkeypatch.setattr(d.programmer, "rollback", rollback)
    try:
        before, after, _ = reload_failing(d, tmp_path, monkeypatch, case, watch)
        assert after[0]["rings"] == before[0]["rings"]
        assert ("reload", slot[80]) in installs  # the failed apply swapped web's ring
        touched = [80, 5353] if case == "released_then_fails" else [80]
        assert [i for p, i in installs if p == "rollback"] == [slot[p] for p in touched]
        now = inner_maps(d.dp)
        assert set(now) == set(inner)
        for port in (80, 5353, 443):
            assert (now[slot[port]] == inner[slot[port]]) == (port not in touched), port
    finally:
        d.dp.close()


def _diff(b, a, at="") -> list:
    if isinstance(b, dict) and isinstance(a, dict):
        return [d for k in set(a) | set(b) for d in _diff(b.get(k), a.get(k), f"{at}.{k}")]
    if isinstance(b, list) and isinstance(a, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(b, a)) for d in _diff(x, y, f"{at}[{i}]")]
    return [] if a == b else [(at, b, a)]
