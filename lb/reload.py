"""SIGHUP's reload of the daemon's config: the file read and checked, the next hops of the
new config resolved, then everything switched at once; whatever fails, the old config and
the maps, rings and routes it made stay (or are put back) in force."""

from __future__ import annotations

import asyncio
import time
from typing import NamedTuple, Optional

from .adminstate import AdminStates
from .config import Config, load_config
from .datapath import EgressConfig
from .egress import egress_config
from .errors import BpfError, ConfigError, XdplbError
from .nexthop import Nexthops
from .programmer import Checkpoint

# lb settings a reload cannot change
FIXED = ("interface", "egress_interface", "xdp_mode", "bpf_pin_path", "flow_table_size",
         "max_vips", "max_backends", "control_socket")
RESTART = ("metrics_listen", "log_format")  # a reload accepts them, a restart applies them


class Running(NamedTuple):
    """What a reload replaces, kept until it is done (for a rollback)."""

    cfg: Config
    admin: AdminStates
    egress: Optional[EgressConfig]
    nexthops: Nexthops
    maps: Checkpoint
    health: tuple


async def reload(d) -> None:
    """Replace the config of `d` (the Daemon) by its file's; a config rejected, or one
    whose apply fails, leaves `d` as it was (see roll_back)."""
    t0, loop = time.perf_counter(), asyncio.get_running_loop()
    try:  # in a thread: reading waits until the file holds still (configread)
        new = await loop.run_in_executor(None, load_config, d.path)
        for k in FIXED:
            if getattr(new.lb, k) != getattr(d.cfg.lb, k):
                raise ConfigError([f"lb.{k} changed: restart xdplb to apply it"])
        if (getattr(new.announce, "table", None) !=
                getattr(d.cfg.announce, "table", None)):
            raise ConfigError(["[announce] added, removed or its table changed: "
                               "restart xdplb to apply it"])
        # the state file is read anew (it may have been edited, or moved)
        admin = await loop.run_in_executor(None, AdminStates, new.lb.state_file)
    except ConfigError as e:
        d.log.error("config_rejected", error=str(e).replace("\n", "; "))
        return
    try:  # for the new config, before it runs: nothing may apply a half-switched state
        resolved = await loop.run_in_executor(None, d.resolve, new)
    except XdplbError as e:
        d.log.error("config_rejected", error=str(e))
        return
    # from here to the apply nothing awaits: no health flush, admin change or
    # next-hop refresh runs in between
    before = {k: e.state for k, e in d.desired().states.items()}
    old = Running(d.cfg, d.admin, d.egress_cfg, d.nexthops,
                  d.programmer.checkpoint(), d.health.checkpoint())
    d.admin, d.cfg = admin, new
    try:
        d.egress_cfg = egress_config(new, d.egress, d.ingress)
        d.health.configure(new.vips)
        rep = d.apply(resolved)
    except Exception as e:  # whatever failed, the old config stays in force
        roll_back(d, old, e)
        return
    finally:
        d.programmer.release(old.maps)
    later = [f"lb.{k}" for k in RESTART if getattr(new.lb, k) != getattr(old.cfg.lb, k)]
    d.log.info("config_reloaded", vips_added=rep.vips_added,
               vips_removed=rep.vips_removed, vips_changed=rep.vips_changed,
               backends_added=rep.backends_added, backends_removed=rep.backends_removed,
               rings_swapped=rep.rings_swapped, restart_needed=later,
               duration_ms=round((time.perf_counter() - t0) * 1e3, 2))
    if later:  # the rest of the file applies
        d.log.warning("config_needs_restart", keys=later, action="restart xdplb")
    for k, to in d.applied.items():  # admin states or health types the config changed
        if k in before and to != before[k]:
            d.log.info("backend_state_changed", vip=k[0], backend=k[1],
                       **{"from": before[k], "to": to}, reason="config reload")


def roll_back(d, old: Running, cause: Exception) -> None:
    """A reload failed partway: the old config, admin states, egress settings, next
    hops and health targets again, and the maps, rings and routes of the old config
    (what the failed apply wrote is rewritten, what it added cleared)."""
    d.admin, d.cfg, d.egress_cfg = old.admin, old.cfg, old.egress
    error = str(cause).replace("\n", "; ") or type(cause).__name__
    if isinstance(cause, BpfError):  # the kernel refused a map update
        error += ": free memory, or raise the map sizes in [lb] (a restart), and reload"
    elif not isinstance(cause, XdplbError):
        error = f"{type(cause).__name__}: {error} (a bug in xdplb: please report it)"
    try:
        d.health.restore(old.health)
        d.programmer.rollback(old.maps)
        d.apply(old.nexthops)
    except Exception as e:  # the refresh loop applies the old config again
        d.maps_stale = True
        d.log.error("config_rejected", error=error)
        d.log.error("rollback_failed", error=str(e) or type(e).__name__,
                    action="retried within 2 s; the old config stays in force")
        return
    d.log.error("config_rejected", error=error)
