"""Quality of the Maglev tables lb.maglev.build makes, for N = 10, 100, 1000 equal-weight
backends and M = 65537, 655373 slots:

* balance: max / mean and min / mean slots per backend (mean = M / N);
* disruption: slots that change owner when backends are removed, *beyond* the removed
  backends' own slots (which must move). Minimal disruption would be 0; the Maglev paper
  reports a small percentage. Measured for removing 1 backend and 10% of them (at least 1),
  over a few random choices (fixed seed), mean and worst;
* build time: median of several builds (lb.maglev.build, the C implementation; the
  backends' keys are made before the clock starts);
* for M = 65537, the same disruption for plain Maglev (no quotas: round-robin turns until
  the table is full, Python here), as a reference for the weighted variant of lb.maglev.

Backends are keyed as lb.specs.backend_key keys them and ordered like
lb.specs.ring_for (sorted by key), so the tables are those the daemon installs.
Writes maglev.json and maglev.png (matplotlib) into the output directory.
"""

from __future__ import annotations

import random
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

from lb import maglev
from lb.specs import backend_key

from . import log_x_axes, publish, save_figure, subplots
from .cost import machine_info, v4_backend

NS = (10, 100, 1000)
MS = (65537, 655373)


def _inputs(addrs: Sequence, ids: Sequence[int]) -> tuple[list, list]:
    """Slotholders and ids in lb.specs.ring_for's order (sorted by key)."""
    order = sorted(range(len(addrs)), key=lambda i: backend_key(addrs[i]))
    return ([maglev.Slotholder(backend_key(addrs[i]), 1) for i in order],
            [ids[i] for i in order])


def _table(addrs: Sequence, ids: Sequence[int], m: int):
    holders, oids = _inputs(addrs, ids)
    return maglev.build(holders, m, oids)


def plain_maglev(keys: Sequence[bytes], m: int) -> list[int]:
    """The original Maglev fill (NSDI 2016, pseudocode 1): backends take turns claiming
    their next preferred empty slot until the table is full. Indexes into keys."""
    perms = [maglev.permutation(k, m) for k in keys]
    nxt = [p[0] for p in perms]
    table = [-1] * m
    filled = 0
    while keys:
        for i, (_, skip) in enumerate(perms):
            pos = nxt[i]
            while table[pos] >= 0:
                pos = (pos + skip) % m
            table[pos] = i
            nxt[i] = (pos + skip) % m
            filled += 1
            if filled == m:
                return table
    return table


def _moved(before, after, removed: set) -> tuple[int, int]:
    """(slots moved beyond the removed backends' own, the removed backends' own slots)."""
    extra = own = 0
    for a, b in zip(before, after):
        if a in removed:
            own += 1
        elif a != b:
            extra += 1
    return extra, own


def quality(n: int, m: int, trials: int = 3, builds: int = 5, seed: int = 1,
            plain: bool = False) -> dict:
    addrs = [v4_backend(i) for i in range(n)]
    ids = list(range(1, n + 1))
    holders, oids = _inputs(addrs, ids)
    times = []
    table = None
    for _ in range(builds):
        t0 = time.perf_counter()
        table = maglev.build(holders, m, oids)
        times.append((time.perf_counter() - t0) * 1e3)
    counts = Counter(table)
    if 0 in counts:
        raise AssertionError(f"N={n} M={m}: {counts[0]} empty slots")
    mean = m / n
    per = [counts.get(i, 0) for i in ids]
    out = {"n": n, "m": m, "build_ms": round(statistics.median(times), 3),
           "max_over_mean": round(max(per) / mean, 5), "min_over_mean": round(min(per) / mean, 5),
           "max_slots": max(per), "min_slots": min(per), "mean_slots": round(mean, 2)}
    rng = random.Random(seed * 1000003 + n * 31 + m)
    for label, k in (("remove_1", 1), ("remove_10pct", max(1, n // 10))):
        extras, owns = [], []
        for _ in range(trials):
            gone = set(rng.sample(ids, k))
            keep = [i for i in range(n) if ids[i] not in gone]
            after = _table([addrs[i] for i in keep], [ids[i] for i in keep], m)
            extra, own = _moved(table, after, gone)
            extras.append(extra)
            owns.append(own)
        out[label] = {"removed": k, "trials": trials,
                      "own_slots_mean": round(statistics.mean(owns), 1),
                      "extra_moved_mean": round(statistics.mean(extras), 1),
                      "extra_moved_max": max(extras),
                      "extra_moved_pct_of_m": round(100 * statistics.mean(extras) / m, 4),
                      "extra_moved_pct_of_own": round(100 * statistics.mean(extras)
                                                      / max(statistics.mean(owns), 1), 2)}
    if plain:
        out["plain_maglev"] = _plain_disruption(addrs, m, rng)
    return out


def _plain_disruption(addrs: Sequence, m: int, rng: random.Random) -> dict:
    """Plain Maglev, one random removal of 1 and of 10%: extra slots moved."""
    by_key = sorted(addrs, key=backend_key)
    before = [by_key[i] for i in plain_maglev([backend_key(a) for a in by_key], m)]
    per = Counter(before)
    res = {"max_over_mean": round(max(per.values()) / (m / len(addrs)), 5)}
    for label, k in (("remove_1", 1), ("remove_10pct", max(1, len(addrs) // 10))):
        gone = set(rng.sample(by_key, k))
        keep = [a for a in by_key if a not in gone]
        after = [keep[i] for i in plain_maglev([backend_key(a) for a in keep], m)]
        extra, own = _moved(before, after, gone)
        res[label] = {"removed": k, "own_slots": own, "extra_moved": extra,
                      "extra_moved_pct_of_own": round(100 * extra / max(own, 1), 2)}
    return res


def run_maglev(out: Optional[str] = None, ns: Sequence[int] = NS, ms: Sequence[int] = MS,
               trials: int = 3, builds: int = 5, plot: bool = True, quiet: bool = False,
               plain_max_m: int = 65537) -> dict:
    """Every (N, M); plain-Maglev reference where M <= plain_max_m (pure Python, slow)."""
    rows = [quality(n, m, trials, builds, plain=m <= plain_max_m) for m in ms for n in ns]
    result = {"rows": rows, "machine": machine_info(),
              "method": "equal weights, IPv4 backends keyed like lb.specs.backend_key; "
                        "extra_moved = slots changing owner whose owner was not removed"}
    publish(result, out, "maglev", (lambda doc, path: _plot(rows, path)) if plot else None,
            None if quiet else print_maglev)
    return result


def _plot(rows: list, path: Path) -> Path:
    fig, ax = subplots(1, 3, figsize=(15, 4.2))
    for m in sorted({r["m"] for r in rows}):
        rs = [r for r in rows if r["m"] == m]
        x = [r["n"] for r in rs]
        ax[0].plot(x, [r["max_over_mean"] for r in rs], "o-", label=f"max/mean M={m}")
        ax[0].plot(x, [r["min_over_mean"] for r in rs], "s--", label=f"min/mean M={m}")
        ax[1].plot(x, [r["remove_1"]["extra_moved_pct_of_m"] for r in rs], "o-",
                   label=f"remove 1, M={m}")
        ax[1].plot(x, [r["remove_10pct"]["extra_moved_pct_of_m"] for r in rs], "s--",
                   label=f"remove 10%, M={m}")
        ax[2].plot(x, [r["build_ms"] for r in rs], "o-", label=f"M={m}")
    ax[0].set_title("balance: slots per backend / mean")
    ax[1].set_title("slots moved beyond the removed backends' own, % of M")
    ax[2].set_title("build time (ms)")
    ax[2].set_yscale("log")
    log_x_axes(ax, "backends N", 8)
    fig.suptitle("xdplb Maglev tables (lb.maglev.build, equal weights)")
    return save_figure(fig, path)


def _removal_cells(rm: dict) -> str:
    """own slots, extra moved: count, % of M, % of own."""
    return (f"{rm['own_slots_mean']:8.0f} {rm['extra_moved_mean']:6.0f} "
            f"{rm['extra_moved_pct_of_m']:6.3f}% {rm['extra_moved_pct_of_own']:6.1f}%")


def print_maglev(r: dict, path: Path | str = "") -> None:
    print("Maglev quality (equal weights; extra = moved slots whose backend stayed)")
    print("slots moved: own = the removed backends' slots; extra = beyond those "
          "(% of M, and relative to own)")
    print(f"{'M':>7} {'N':>5} {'max/mean':>9} {'min/mean':>9} {'build ms':>9} "
          f"{'rm1 own':>8} {'rm1 extra':>22} {'rm10% own':>10} {'rm10% extra':>22}")
    for x in r["rows"]:
        one, tenth = _removal_cells(x["remove_1"]), _removal_cells(x["remove_10pct"])
        print(f"{x['m']:7} {x['n']:5} {x['max_over_mean']:9.4f} {x['min_over_mean']:9.4f} "
              f"{x['build_ms']:9.2f} {one}  {tenth}")
    for x in r["rows"]:
        p = x.get("plain_maglev")
        if p:
            a, b = p["remove_1"], p["remove_10pct"]
            print(f"  plain Maglev M={x['m']} N={x['n']}: max/mean {p['max_over_mean']:.4f}, "
                  f"extra moved rm1 {a['extra_moved']} ({a['extra_moved_pct_of_own']:.1f}% "
                  f"of own), rm10% {b['extra_moved']} ({b['extra_moved_pct_of_own']:.1f}%)")
    if path:
        print(f"-> {path}" + (f", {r['plot']}" if r.get("plot") else ""))
