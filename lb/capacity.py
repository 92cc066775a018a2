"""What the data path's maps will cost in memory, and whether this machine can afford it.

The maps are allocated when the program loads (all of them arrays or preallocated
hashes), so an absurd `max_backends` or `flow_table_size` would take the machine's
memory at start; `check` and the start refuse it first, naming the key that costs most."""

from __future__ import annotations

import ctypes
import os
from typing import Optional

from . import layout
from .flowtable import buckets_for
from .vipindex import slots_for

# share of the machine's memory the maps may take
MEMORY_SHARE = 0.5


def _cpus() -> int:
    try:
        from .native import num_cpus
        return num_cpus()
    except Exception:  # no extension built: the scheduler's view is close enough
        return os.cpu_count() or 1


def estimate(lb, vips: int, ncpus: Optional[int] = None) -> dict[str, int]:
    """Bytes by the config key that sizes them (lb: an LbSection; vips: VIPs in the
    config, each with a ring of lb.ring_size, two while one is swapped)."""
    ncpus = ncpus or _cpus()
    size = ctypes.sizeof
    return {
        "max_backends": lb.max_backends * ncpus * size(layout.BackendSlot),
        "max_vips": lb.max_vips * ((ncpus + 1) * size(layout.Counters) +
                                   2 * size(layout.VipMeta) + 2 * size(layout.AddrKey))
        + slots_for(lb.max_vips) * size(layout.VipSlot),
        "flow_table_size": buckets_for(lb.flow_table_size) * size(layout.FlowBucket),
        "ring_size": 2 * vips * layout.ring_layout(lb.max_backends).ring_bytes(lb.ring_size),
    }


def memory_total() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def memory_problem(cfg, total: Optional[int] = None, ncpus: Optional[int] = None
                   ) -> Optional[str]:
    """One line naming the costliest key when the maps would take more than
    MEMORY_SHARE of the machine's memory, else None."""
    total = total if total is not None else memory_total()
    if not total:
        return None
    cost = estimate(cfg.lb, len(cfg.vips), ncpus)
    need = sum(cost.values())
    if need <= total * MEMORY_SHARE:
        return None
    key = max(cost, key=cost.get)
    return (f"lb.{key}: the data path's maps would take about {_gib(need)} "
            f"({_gib(cost[key])} for {key}), more than {MEMORY_SHARE:.0%} of this "
            f"machine's {_gib(total)}; lower lb.{key}")


def require_memory(cfg) -> None:
    """ConfigError (exit 1) when memory_problem finds one."""
    from .errors import ConfigError
    problem = memory_problem(cfg)
    if problem:
        raise ConfigError(problem)
