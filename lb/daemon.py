"""`xdplb --config PATH`: the load balancer in the foreground.

Start: preflight, load the data path (adopting compatible pinned maps of an earlier
instance, so flows and counters survive a restart), attach or atomically replace the
program, fill the maps, start health checks and the control socket. SIGHUP reloads the
config (a broken one is rejected and the old one stays in force); SIGTERM/SIGINT detach
and unpin, unless keep_datapath_on_exit. A killed daemon leaves the program attached and
forwarding.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
import signal
import socket
import time
from typing import Optional

from . import layout as L
from .adminstate import AdminStates
from .config import Config, load_config
from .control import ControlServer
from .datapath import Datapath, EgressConfig, Limits
from .errors import ConfigError, XdplbError
from .metrics import MetricsServer
from .health import Probe, ProbeResult, Scheduler, Verdict
from .nexthop import Netlink
from .native import xdp_attach, xdp_detach, xdp_query, lib as nlib
from . import policy, preflight
from .programmer import Programmer
from .stats import stats_snapshot

NEXTHOP_REFRESH_S = 2.0
NEXTHOP_RETRY_S = 0.2
HEALTH_BATCH_S = 0.05  # health flips gathered into one map update


def _limits(cfg: Config) -> Limits:
    return Limits(max_vips=cfg.lb.max_vips, max_backends=cfg.lb.max_backends,
                  flow_table_size=cfg.lb.flow_table_size)


_VOLATILE_ROUTE_ATTRS = ("RTA_CACHEINFO", "RTA_EXPIRES")


def _routing_digest(nl: Netlink, oif: int) -> Optional[bytes]:
    """A digest of every route (all tables, both families) and rule, without the
    counters that change by themselves; None when the dump fails (then nothing is
    cached). Link and address changes show here too (linkdown flags, connected and
    local routes)."""
    try:
        h = hashlib.blake2b(digest_size=16)
        h.update(str(oif).encode())
        for fam in (socket.AF_INET, socket.AF_INET6):
            for r in nl.ipr.route("dump", family=fam):
                h.update(repr((r["dst_len"], r["src_len"], r["tos"], r["table"], r["proto"],
                               r["scope"], r["type"], r["flags"],
                               [(k, v) for k, v in r["attrs"]
                                if k not in _VOLATILE_ROUTE_ATTRS])).encode())
            for r in nl.ipr.get_rules(family=fam):
                h.update(repr((r["dst_len"], r["src_len"], r["tos"], r["table"],
                               r["action"], r["flags"], r["attrs"])).encode())
        return h.digest()
    except Exception:  # no caching rather than a wrong cache
        return None


class Daemon:
    def __init__(self, path: str, cfg: Config, log):
        self.path, self.cfg, self.log = path, cfg, log
        self.nl: Optional[Netlink] = None
        self.dp: Optional[Datapath] = None
        self.prog: Optional[Programmer] = None
        self.admin = AdminStates(cfg.lb.state_file)
        self.verdicts: dict[tuple[str, str], Verdict] = {}
        self.probes: dict[Probe, list[tuple[str, str]]] = {}
        self.scheduler: Optional[Scheduler] = None
        self.control: Optional[ControlServer] = None
        self.attached: Optional[tuple[int, str]] = None
        self.macs: dict[str, bytes] = {}
        self.seed_up: set[tuple[str, str]] = set()
        self.applied: dict[tuple[str, str], str] = {}  # effective state the maps hold
        self.nexthop_keys: dict[str, str] = {}
        self.started = time.time()
        self._route_cache: dict = {}  # backend -> (next hop, oif) under _route_digest
        self._route_digest: Optional[bytes] = None
        self._pending: list[dict] = []  # backend_state_changed events awaiting their apply
        self._flush: Optional[asyncio.TimerHandle] = None

    # --- start ---------------------------------------------------------------------
    def start(self) -> None:
        cfg = self.cfg
        preflight.check_privileges()
        preflight.ensure_bpffs(cfg.lb.bpf_pin_path)
        self.nl = Netlink()
        self.ingress = self.nl.interface(cfg.lb.interface)
        self.egress = (self.nl.interface(cfg.lb.egress_interface) if cfg.lb.egress_interface
                       else self.ingress)
        self.dp = Datapath(_limits(cfg), pin_dir=cfg.lb.bpf_pin_path)
        for name, why in self.dp.replaced.items():
            self.log.warning("pinned_map_replaced", map=name, reason=why)
        self.prog = Programmer(self.dp, keep_rings=False)
        adopted = self.prog.adopt() if "vips" in self.dp.adopted else 0
        self.seed_up = self._adopted_up()
        self._program_egress()
        resolved = self.resolve_nexthops(self.nl)
        for _ in range(10):  # provoked ARP/ND usually answers within milliseconds
            if all(k in resolved[0] for k in resolved[1].values()):
                break
            time.sleep(0.05)
            resolved = self.resolve_nexthops(self.nl)
        self.apply("start", resolved)
        mode = self._attach()
        self.dp.pin_program()
        self.log.info("datapath_attached", interface=cfg.lb.interface, mode=mode,
                      egress=self.egress.name, adopted_maps=len(self.dp.adopted),
                      adopted_vips=adopted)

    def _adopted_up(self) -> set[tuple[str, str]]:
        """Backends an earlier instance left taking flows: they count as up until their
        own checks say otherwise, so a restart does not empty the rings."""
        up = set()
        for v in self.cfg.vips:
            cur = self.prog.vips.get(v.ident)
            for b in v.backends:
                bid = cur.bids.get(b.address) if cur else None
                if bid and cur.flags.get(bid, (0, 0))[0] & L.BE_F_FLOWS_STAY:
                    up.add((v.name, str(b.address)))
        return up

    def _attach(self) -> str:
        """Attach, or replace our earlier program without a gap (XDP_FLAGS_REPLACE)."""
        idx = self.ingress.index
        q = xdp_query(idx)
        modes = ["native", "generic"] if self.cfg.lb.xdp_mode == "auto" else [self.cfg.lb.xdp_mode]
        current = {"native": q["drv"], "generic": q["skb"]}
        last_err: Optional[Exception] = None
        for mode in modes:
            old_fd = -1
            if current[mode]:
                old_fd = nlib.bpf_prog_get_fd_by_id(current[mode])
            try:
                xdp_attach(idx, self.dp.prog_fd, mode, old_prog_fd=old_fd)
                self.attached = (idx, mode)
                other = "generic" if mode == "native" else "native"
                if current.get(other):
                    xdp_detach(idx, other)
                return mode
            except XdplbError as e:
                last_err = e
                if mode == "native" and len(modes) > 1:
                    self.log.info("native_xdp_unavailable", interface=self.ingress.name,
                                  error=str(e), fallback="generic")
            finally:
                if old_fd >= 0:
                    os.close(old_fd)
        raise XdplbError(f"cannot attach XDP to {self.ingress.name}: {last_err}")

    def _program_egress(self) -> None:
        cfg, eg = self.cfg, self.egress
        src4 = cfg.lb.source_v4 or (eg.v4[0] if eg.v4 else None)
        src6 = cfg.lb.source_v6 or (eg.v6[0] if eg.v6 else None)
        fams = {b.address.version for v in cfg.vips for b in v.backends}
        if 4 in fams and src4 is None:
            raise XdplbError(f"IPv4 backends need an outer source: set lb.source_v4 or add an "
                             f"IPv4 address to {eg.name}")
        if 6 in fams and src6 is None:
            raise XdplbError(f"IPv6 backends need an outer source: set lb.source_v6 or add an "
                             f"IPv6 address to {eg.name}")
        if cfg.lb.egress_interface:  # the port first: never a redirect to an empty slot
            self.dp.set_tx_port(eg.index)
        self.dp.set_config(EgressConfig(
            smac=eg.mac, encap=L.ENCAP_GUE if cfg.lb.encap == "gue" else L.ENCAP_IPIP,
            tx_mode=L.TX_REDIRECT if cfg.lb.egress_interface else L.TX_XDP_TX,
            source_v4=src4, source_v6=src6, gue_port=cfg.lb.gue_port, mtu=eg.mtu,
            flow_insert_limit=cfg.lb.flow_insert_limit))

    # --- state -> maps -------------------------------------------------------------
    @property
    def cfg(self) -> Config:
        return self._cfg

    @cfg.setter
    def cfg(self, cfg: Config) -> None:
        self._cfg = cfg
        self._vip_by_name = {v.name: v for v in cfg.vips}
        self._cfg_state = {(v.name, str(b.address)): b.state for v in cfg.vips
                           for b in v.backends}

    def _admin_of(self, vip: str, backend: str) -> str:
        return self.admin.get(vip, backend) or self._cfg_state.get((vip, backend), "active")

    def _up_of(self, vip: str, backend: str) -> bool:
        v = self._vip_by_name.get(vip)
        if v is not None and v.health.type == "none":
            return True
        verdict = self.verdicts.get((vip, backend))
        if verdict is None:
            return (vip, backend) in self.seed_up
        return verdict.up

    def _nexthop_of(self, addr) -> str:
        return self.nexthop_keys.setdefault(str(addr), f"backend {addr}")

    def resolve_nexthops(self, nl: Optional[Netlink] = None,
                         cfg: Optional[Config] = None) -> tuple[dict, dict]:
        """(key -> MAC of the next hop, backend -> key) for every backend of cfg (default:
        the running config); unresolved next hops are provoked. Blocking netlink I/O:
        called before the event loop runs, or in a worker thread with its own netlink
        socket (pyroute2 runs its own loop)."""
        own = nl is None
        nl = nl or Netlink()
        try:
            return self._resolve(nl, cfg or self.cfg)
        finally:
            if own:
                nl.close()

    def _resolve(self, nl: Netlink, cfg: Config) -> tuple[dict, dict]:
        """Routes are asked per backend only when the routing state changed since the
        last time (a digest of routes and rules); neighbours once per distinct next hop.
        With a thousand backends behind one gateway a refresh is a few netlink dumps,
        not two thousand requests (which took ~0.6 s of CPU every NEXTHOP_REFRESH_S)."""
        macs, keys = {}, {}
        addrs = {b.address for v in cfg.vips for b in v.backends}
        digest = _routing_digest(nl, self.egress.index)
        cache = self._route_cache if digest is not None and \
            digest == self._route_digest else {}
        routes = {a: cache[a] for a in addrs if a in cache}
        seen: dict[str, Optional[bytes]] = {}
        for addr in addrs:
            found = routes.get(addr)
            if found is None:
                try:
                    found = routes[addr] = nl.route_nexthop(addr, self.egress.index)
                except XdplbError as e:
                    self.log.warning("nexthop_unroutable", backend=str(addr), error=str(e))
                    keys[str(addr)] = f"backend {addr}"
                    continue
            hop, oif = found
            key = f"{hop}%{oif}"
            keys[str(addr)] = key
            if key not in seen:
                seen[key] = mac = nl.neighbour_mac(hop, oif)
                if mac is None:
                    nl.provoke(hop)
                else:
                    macs[key] = mac
        self._route_cache, self._route_digest = routes, digest
        return macs, keys

    def apply(self, why: str, resolved: Optional[tuple[dict, dict]] = None):
        """Push the current state to the maps. `resolved`: fresh next hops, else the
        last ones (health and admin changes do not move next hops)."""
        if resolved is not None:
            self.macs, self.nexthop_keys = resolved
        specs = policy.vip_specs(self.cfg, self._admin_of, self._up_of, self._nexthop_of)
        rep = self.prog.apply(specs, self.macs)
        # what the maps now say, for `stats` (health flips reach the maps in batches)
        self.applied = {(v.name, str(b.address)): self._effective(v.name, str(b.address))
                        for v in self.cfg.vips for b in v.backends}
        return rep

    # --- health --------------------------------------------------------------------
    def _configure_health(self) -> None:
        probes: dict[Probe, list[tuple[str, str]]] = {}
        intervals: dict[Probe, float] = {}
        keep = set()
        for v in self.cfg.vips:
            h = v.health
            if h.type == "none":
                continue
            for b in v.backends:
                p = Probe(h.type, str(b.address), h.port or v.port, h.timeout,
                          getattr(h, "path", "/"), getattr(h, "expect_status", 200))
                probes.setdefault(p, []).append((v.name, str(b.address)))
                intervals[p] = min(intervals.get(p, h.interval), h.interval)
                key = (v.name, str(b.address))
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

    def _on_probe(self, p: Probe, r: ProbeResult) -> None:
        """A check's result, for every VIP/backend pair using that probe. State flips are
        pushed to the maps together, HEALTH_BATCH_S after the first one (a switch failing
        under a thousand backends costs a few ring swaps, not a thousand), and logged
        once they are in."""
        for k in self.probes.get(p, ()):
            v = self.verdicts.get(k)
            flip = v.record(r) if v is not None else None
            if flip:
                admin = self._admin_of(*k)
                # health hidden by an admin maint changes no state: logged, not a transition
                self._pending.append({
                    "vip": k[0], "backend": k[1],
                    "from": policy.effective(admin, flip[0]).state,
                    "to": policy.effective(admin, flip[1]).state, "reason": r.reason,
                    "health": "up" if flip[1] else "down",
                    "consecutive": v.run, "check_count": v.checks})
        if self._pending and self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(HEALTH_BATCH_S,
                                                                self._flush_health)

    def _flush_health(self) -> None:
        self._flush = None
        events, self._pending = self._pending, []
        try:
            self.apply("health")
        except Exception as e:  # keep checking; try the maps again shortly
            self.log.error("health_apply_failed", error=str(e))
            self._flush = asyncio.get_running_loop().call_later(1.0, self._flush_health)
        for ev in events:
            same = ev["from"] == ev["to"]
            self.log.info("backend_health_changed" if same else "backend_state_changed", **ev)

    def _on_health_error(self, p: Probe, e: BaseException) -> None:
        self.log.error("health_callback_failed", backend=p.address, port=p.port,
                       error=f"{type(e).__name__}: {e}")

    def _effective(self, vip: str, backend: str) -> str:
        return policy.effective(self._admin_of(vip, backend), self._up_of(vip, backend)).state

    # --- admin ---------------------------------------------------------------------
    def set_admin(self, vip: str, backend: str, state: str) -> str:
        v = next((v for v in self.cfg.vips if v.name == vip or str(v.address) == vip), None)
        if v is None:
            raise KeyError(f"unknown VIP {vip!r}")
        try:
            addr = str(ipaddress.ip_address(backend))
        except ValueError:
            raise KeyError(f"backend {backend!r} is not an IP address") from None
        if not any(str(b.address) == addr for b in v.backends):
            raise KeyError(f"VIP {v.name} has no backend {addr}")
        before = self._effective(v.name, addr)
        self.admin.set(v.name, addr, state)
        self.apply("admin")
        after = self._effective(v.name, addr)
        self.log.info("admin_state_set", vip=v.name, backend=addr, state=state)
        if after != before:
            self.log.info("backend_state_changed", vip=v.name, backend=addr,
                          **{"from": before, "to": after}, reason=f"admin {state}")
        return after

    # --- reload --------------------------------------------------------------------
    async def reload_async(self) -> None:
        """SIGHUP. Reloads run one at a time, each reading the file when its turn comes,
        so two quick SIGHUPs can never apply an older file after a newer one."""
        async with self._reload_lock:
            await self._reload()

    async def _reload(self) -> None:
        t0 = time.perf_counter()
        try:
            new = load_config(self.path)
            fixed = ("interface", "egress_interface", "xdp_mode", "bpf_pin_path",
                     "flow_table_size", "max_vips", "max_backends", "control_socket")
            for k in fixed:
                if getattr(new.lb, k) != getattr(self.cfg.lb, k):
                    raise ConfigError([f"lb.{k} changed: restart xdplb to apply it"])
        except ConfigError as e:
            self.log.error("config_rejected", error=str(e).replace("\n", "; "))
            return
        try:  # for the new config, before it runs: nothing may apply a half-switched state
            resolved = await asyncio.get_running_loop().run_in_executor(
                None, self.resolve_nexthops, None, new)
        except XdplbError as e:
            self.log.error("config_rejected", error=str(e))
            return
        # from here to the apply nothing awaits: no health flush, admin change or
        # next-hop refresh runs in between
        before = {(v.name, str(b.address)): self._effective(v.name, str(b.address))
                  for v in self.cfg.vips for b in v.backends}
        old, self.cfg = self.cfg, new
        try:
            self._program_egress()
            self._configure_health()
            rep = self.apply("reload", resolved)
        except XdplbError as e:
            self.cfg = old
            self.log.error("config_rejected", error=str(e))
            return
        self.log.info("config_reloaded", vips_added=rep.vips_added,
                      vips_removed=rep.vips_removed, vips_changed=rep.vips_changed,
                      backends_added=rep.backends_added, backends_removed=rep.backends_removed,
                      rings_swapped=rep.rings_swapped,
                      duration_ms=round((time.perf_counter() - t0) * 1e3, 2))
        for v in new.vips:  # admin states or health types the new config changed
            for b in v.backends:
                k = (v.name, str(b.address))
                if k in before and (to := self._effective(*k)) != before[k]:
                    self.log.info("backend_state_changed", vip=k[0], backend=k[1],
                                  **{"from": before[k], "to": to}, reason="config reload")

    # --- run -----------------------------------------------------------------------
    def stats(self) -> dict:
        return stats_snapshot(self)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        def on_hup() -> None:
            task = loop.create_task(self.reload_async())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        loop.add_signal_handler(signal.SIGHUP, on_hup)
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        self._tasks: set = set()
        self._reload_lock = asyncio.Lock()
        self.scheduler = Scheduler(self._on_probe, on_error=self._on_health_error)
        self._configure_health()
        # adopted health seeds the first verdicts only: a backend a later reload adds
        # must pass its checks before it gets traffic, even one the old instance had up
        self.seed_up = set()
        self.control = ControlServer(self, self.cfg.lb.control_socket)
        await self.control.start()
        metrics = None
        if self.cfg.lb.metrics_address:
            host, port = self.cfg.lb.metrics_address
            metrics = MetricsServer(self.stats, host, port)
            try:
                await metrics.start()
            except OSError as e:
                await self.control.close()
                raise XdplbError(f"cannot listen on metrics_listen {host}:{port}: "
                                 f"{e.strerror}; pick a free address") from None
        refresher = loop.create_task(self._refresh_loop())
        try:
            await stop.wait()
        finally:
            refresher.cancel()
            self.scheduler.stop()
            if self._flush is not None:
                self._flush.cancel()
            await self.control.close()
            if metrics:
                await metrics.close()
            self.shutdown()
        return 0

    def unresolved(self) -> int:
        return sum(1 for k in set(self.nexthop_keys.values()) if k not in self.macs)

    async def _refresh_loop(self) -> None:
        """Follow next-hop changes within NEXTHOP_REFRESH_S; retry unresolved ones fast."""
        while True:
            await asyncio.sleep(NEXTHOP_RETRY_S if self.unresolved() else NEXTHOP_REFRESH_S)
            try:
                cfg = self.cfg
                resolved = await asyncio.get_running_loop().run_in_executor(
                    None, self.resolve_nexthops, None, cfg)
                # a reload meanwhile brought its own next hops: these may lack backends
                if self.cfg is cfg and resolved != (self.macs, self.nexthop_keys):
                    self.apply("refresh", resolved)
            except Exception as e:  # keep forwarding whatever happens here
                self.log.warning("nexthop_refresh_failed", error=str(e))

    def shutdown(self) -> None:
        keep = self.cfg.lb.keep_datapath_on_exit
        if not keep and self.attached:
            try:
                xdp_detach(*self.attached)
            except XdplbError as e:
                self.log.warning("detach_failed", error=str(e))
            self.dp.unpin_all()
        self.log.info("stopped", datapath_kept=keep)
        if self.dp:
            self.dp.close()


def run(path: str, log) -> int:
    cfg = load_config(path)
    d = Daemon(path, cfg, log)
    try:
        d.start()
    finally:
        # pyroute2 runs its own event loop: close it before asyncio's starts
        if d.nl:
            d.nl.close()
            d.nl = None
    return asyncio.run(d.run())
