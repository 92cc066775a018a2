"""`xdplb --config PATH`: the load balancer in the foreground.

Start: preflight, load the data path (adopting pinned maps of an earlier instance), attach
or atomically replace the program, fill the maps, start health checks and the control
socket. SIGHUP reloads the config (lb/reload.py: a broken one is rejected, the old one
stays); SIGTERM/SIGINT detach and unpin, unless keep_datapath_on_exit. A killed daemon
leaves the program attached and forwarding. The daemon wires the parts and serialises what changes
the maps: next hops from `nexthop.Resolver`, health from `healthstate.HealthBook`, the
maps' contents from `policy.vip_specs`, written by `Programmer.apply`; interfaces
re-created or changed are followed by `linkfollow.LinkFollower`; `sdnotify.Notifier`
tells systemd; `announce.Announcer` keeps the VIP routes of [announce]."""

from __future__ import annotations

import asyncio
import math
import signal
from typing import Optional

from . import policy, preflight, sdnotify
from .adminstate import AdminStates, admin_lookup, find_pair
from .announce import Announcer
from .attach import attach
from .config import Config, load_config
from .control import ControlServer
from .datapath import Datapath, EgressConfig, Limits
from .egress import egress_config
from .errors import XdplbError
from .healthstate import HealthBook
from .linkfollow import LinkFollower
from .metrics import MetricsServer
from .native import xdp_detach
from .instancelock import InstanceLocks
from .nexthop import Interface, Netlink, Nexthops, Resolver
from .programmer import Programmer
from .reload import reload
from .stats import BackendView, stats_snapshot

NEXTHOP_REFRESH_S = 2.0
NEXTHOP_RETRY_S = 0.2


class Daemon:
    def __init__(self, path: str, cfg: Config, log):
        self.admin = AdminStates(cfg.lb.state_file)
        self.path, self.cfg, self.log = path, cfg, log
        self.notify = sdnotify.Notifier(log, lambda: sdnotify.status_line(
            len(self.cfg.vips), self.applied))  # systemd: READY/RELOADING/STATUS/WATCHDOG
        self.nl: Optional[Netlink] = None
        self.ingress: Optional[Interface] = None  # the attached one, and the egress one
        self.egress: Optional[Interface] = None
        self.dp: Optional[Datapath] = None
        self.programmer: Optional[Programmer] = None
        self.health = HealthBook(log, self._admin_of, lambda flips: self.apply())
        self.resolver = Resolver(log)
        self.nexthops = Nexthops()
        self.egress_cfg: Optional[EgressConfig] = None
        self.control: Optional[ControlServer] = None
        self.locks = InstanceLocks()
        self.attached: Optional[tuple[int, str]] = None
        self.applied: dict[tuple[str, str], str] = {}  # effective state the maps hold
        self.announcer: Optional[Announcer] = None
        self.interface_missing = False  # nothing forwards: nothing is announced
        self.maps_stale = False  # a rejected reload's rollback did not get through

    # --- start ---------------------------------------------------------------------
    def start(self) -> None:
        cfg = self.cfg
        preflight.check_privileges()
        preflight.check_architecture()
        preflight.raise_fd_limit()
        # nothing is touched before this instance owns its pin path, interface and
        # control socket: a second instance must leave the first one alone
        self.locks.acquire(cfg.lb.bpf_pin_path, [cfg.lb.interface])
        self.control = ControlServer(self, cfg.lb.control_socket)
        self.control.claim()
        preflight.ensure_bpffs(cfg.lb.bpf_pin_path)
        self.nl = Netlink()
        self.ingress = self.nl.interface(cfg.lb.interface)
        self.egress = (self.nl.interface(cfg.lb.egress_interface) if cfg.lb.egress_interface
                       else self.ingress)
        self.dp = Datapath(Limits(max_vips=cfg.lb.max_vips, max_backends=cfg.lb.max_backends,
                                  flow_table_size=cfg.lb.flow_table_size),
                           pin_dir=cfg.lb.bpf_pin_path)
        for name, why in self.dp.replaced.items():
            self.log.warning("pinned_map_replaced", map=name, reason=why)
        self.programmer = Programmer(self.dp, keep_rings=False)
        # adopted backends carry generations even when their VIPs are gone
        adopted = (self.programmer.adopt() if {"vips", "backends"} & set(self.dp.adopted)
                   else 0)
        self.health.seed(cfg.vips, self.programmer.installed)
        self.egress_cfg = egress_config(cfg, self.egress, self.ingress)
        if cfg.announce:  # routes a killed instance left: ours again
            self.announcer = Announcer(cfg.announce.table, self.log, self._hold_ended)
            kept, removed = self.announcer.adopt(cfg)
            self.log.info("routes_adopted", table=cfg.announce.table, kept=kept,
                          removed=removed)
        self.apply(self.resolve(cfg, self.nl, settle=True))
        mode = attach(self.ingress.index, self.ingress.name, self.dp.prog_fd,
                      cfg.lb.xdp_mode, self.log)
        self.attached = (self.ingress.index, mode)
        self.dp.pin_program()
        if self.announcer:  # only a program attached and forwarding is announced
            self.announcer.live = True
            self.apply()
        self.log.info("datapath_attached", interface=cfg.lb.interface, mode=mode,
                      egress=self.egress.name, adopted_maps=len(self.dp.adopted),
                      adopted_vips=adopted)

    # --- state -> maps -------------------------------------------------------------
    @property
    def cfg(self) -> Config:
        return self._cfg

    @cfg.setter
    def cfg(self, cfg: Config) -> None:
        self._cfg = cfg
        self._vip_by_name = {v.name: v for v in cfg.vips}
        self._admin_lookup = admin_lookup(self.admin, cfg)

    def _admin_of(self, vip: str, backend: str) -> str:
        return self._admin_lookup(vip, backend)

    def _up_of(self, vip: str, backend: str) -> bool:
        v = self._vip_by_name.get(vip)
        return (v is not None and v.health.type == "none") or self.health.up(vip, backend)

    def _verdicted(self, vip: str, backend: str) -> bool:
        """The pair's first verdict is in: it was checked and is not on its way up (a
        backend with successes short of `rise` is up on the nodes that saw it longer;
        announcing before it is up here would put their flows on a partial ring)."""
        verdict = self.health.verdict(vip, backend)
        return verdict is not None and verdict.checks > 0 and (verdict.up or
                                                                verdict.ok_run == 0)

    def resolve(self, cfg: Config, nl: Optional[Netlink] = None,
                 settle: bool = False) -> Nexthops:
        """Next hops of cfg's backends (blocking: see Resolver.resolve)."""
        addrs = {b.address for v in cfg.vips for b in v.backends}
        return (self.resolver.settled if settle else self.resolver.resolve)(
            addrs, self.egress.index, nl)

    def desired(self) -> policy.Desired:
        return policy.vip_specs(self.cfg, self._admin_of, self._up_of, self.nexthops.key_of)

    def apply(self, resolved: Optional[Nexthops] = None):
        """Push the current state to the maps. `resolved`: fresh next hops, else the
        last ones (health and admin changes do not move next hops)."""
        if resolved is not None:
            self.nexthops = resolved
        specs, states = self.desired()
        ann = self.announcer
        if ann:  # withdrawals before the maps change, announcements after
            decisions = ann.decide(self.cfg, states, self._verdicted,
                                   self.admin.announce_withdrawn, self.interface_missing)
            ann.withdraw(decisions, self.applied, self.cfg)
            held_up = ann.up_view(self._up_of)
            if held_up:  # rings of VIPs just withdrawn keep their health view
                specs, states = policy.vip_specs(self.cfg, self._admin_of, held_up,
                                                 self.nexthops.key_of)
        rep = self.programmer.apply(specs, self.nexthops.macs, egress=self.egress_cfg)
        self.maps_stale = False
        self.applied = {k: e.state for k, e in states.items()}
        if ann:
            ann.announce(decisions)
        return rep

    def _hold_ended(self) -> None:
        try:
            self.apply()
        except Exception as e:  # the health flush's retry applies it later
            self.log.error("health_apply_failed", error=str(e))

    def backend_view(self) -> dict[tuple[str, str], BackendView]:
        """(VIP name, backend address) -> what `stats` shows of that pair, for every pair
        of the config (one the maps do not hold yet shows the state it is to get)."""
        view = {}
        for v in self.cfg.vips:
            for b in v.backends:
                k = (v.name, str(b.address))
                admin, up = self._admin_of(*k), self._up_of(*k)
                state = self.applied.get(k) or policy.effective(admin, up).state
                verdict = self.health.verdict(*k)
                view[k] = BackendView(admin, up, state, verdict.last if verdict else None,
                                      verdict.checks if verdict else 0)
        return view

    # --- admin ---------------------------------------------------------------------
    def set_admin(self, vip: str, backend: str, state: str) -> str:
        name, addr = find_pair(self.cfg, vip, backend)
        before = policy.effective(self._admin_of(name, addr), self._up_of(name, addr)).state
        self.admin.set(name, addr, state)  # nothing changes when the file cannot be written
        self.apply()
        after = self.applied[(name, addr)]
        self.log.info("admin_state_set", vip=name, backend=addr, state=state)
        if after != before:
            self.log.info("backend_state_changed", vip=name, backend=addr,
                          **{"from": before, "to": after}, reason=f"admin {state}")
        return after

    def set_announce(self, action: str) -> dict:
        """`xdplb announce {status,withdraw,restore}`: persisted first (as set_admin)."""
        if action in ("withdraw", "restore"):
            if self.announcer is None:
                raise KeyError(f"no [announce] in {self.path}: nothing is announced")
            self.admin.set_announce_withdrawn(action == "withdraw")
            self.apply()
            self.log.info("announce_set", action=action)
        return self.announce_status()

    def announce_status(self) -> dict:
        ann = self.announcer
        if ann is None:
            return {"configured": False, "vips": []}
        delay = self.cfg.announce.withdraw_delay
        # until the last withdrawal has had withdraw_delay to reach the routers (0: it
        # has, or nothing was withdrawn); rounded up, so 0 is never early
        settles_in = math.ceil(ann.delay_left(delay) * 1e3) / 1e3
        return {"configured": True, "table": self.cfg.announce.table,
                "withdrawn": self.admin.announce_withdrawn, "held": ann.held(),
                "withdraw_delay": delay, "settles_in": settles_in,
                "vips": [{"name": v.name, "address": str(v.address),
                          "announced": ann.is_announced(v.address),
                          "reason": ann.reason(v.address)} for v in self.cfg.vips]}

    # --- reload --------------------------------------------------------------------
    async def reload_async(self) -> None:
        """SIGHUP. Reloads run one at a time, each reading the file when its turn comes,
        so two quick SIGHUPs can never apply an older file after a newer one."""
        async with self._reload_lock:
            with self.notify.reloading():
                await reload(self)

    # --- run -----------------------------------------------------------------------
    def stats(self) -> dict:
        return stats_snapshot(self)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        self._tasks: set = set()
        self._reload_lock = asyncio.Lock()

        def on_hup() -> None:
            task = loop.create_task(self.reload_async())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        loop.add_signal_handler(signal.SIGHUP, on_hup)
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        self.health.start(self.cfg.vips)
        await self.control.start()
        metrics = None
        if self.cfg.lb.metrics_address:
            host, port = self.cfg.lb.metrics_address
            metrics = MetricsServer(self.stats, host, port, log=self.log)
            try:
                await metrics.start()
            except OSError as e:
                await self.control.close()
                raise XdplbError(f"cannot listen on metrics_listen {host}:{port}: "
                                 f"{e.strerror}; pick a free address") from None
        tasks = (loop.create_task(self._refresh_loop()),
                 loop.create_task(self.notify.serve(self.health.first_round_done)))
        links = LinkFollower(self)  # an interface re-created gets the program again
        links.start(loop)
        try:
            await stop.wait()
            if self.announcer and not self.cfg.lb.keep_datapath_on_exit:
                await self._withdraw_all(stop)
        finally:
            for task in tasks:
                task.cancel()
            links.close()
            self.health.stop()
            await self.control.close()
            if metrics:
                await metrics.close()
            self.shutdown()
        return 0

    async def _withdraw_all(self, stop: asyncio.Event) -> None:
        """SIGTERM with [announce]: every route withdrawn, then forwarding goes on until
        the last withdrawal is withdraw_delay old (the router moves the traffic
        meanwhile); a second SIGTERM/SIGINT cuts the wait short."""
        self.announcer.stopping = True
        try:
            self.apply()
        except Exception as e:  # still stop
            self.log.error("withdraw_failed", error=str(e))
        wait = self.announcer.delay_left(self.cfg.announce.withdraw_delay)
        if wait > 0:
            self.log.info("stopping_after_withdraw_delay", seconds=round(wait, 3))
            stop.clear()
            try:
                await asyncio.wait_for(stop.wait(), wait)
            except asyncio.TimeoutError:
                pass

    async def _refresh_loop(self) -> None:
        """Follow next-hop changes within NEXTHOP_REFRESH_S; retry unresolved ones fast.
        With [announce], put back routes of ours someone removed, and retry failed ones."""
        while True:
            await asyncio.sleep(NEXTHOP_RETRY_S if self.nexthops.unresolved()
                                else NEXTHOP_REFRESH_S)
            try:
                if self.announcer:  # our routes, if someone else removed them
                    self.announcer.restore_routes()
                cfg = self.cfg
                resolved = await asyncio.get_running_loop().run_in_executor(
                    None, self.resolve, cfg)
                # a reload meanwhile brought its own next hops: these may lack backends
                if self.cfg is cfg and resolved != self.nexthops:
                    self.apply(resolved)
                elif self.maps_stale or (self.announcer and self.announcer.failing):
                    self.apply()  # a rollback that failed, or routes: try again
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
        if self.announcer:
            self.announcer.close()
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
