"""The benchmark runner (bench/): small counts, real BPF, no timing assertions.

What is checked is that the runner measures what it names: every case's runs all took the
named path (verdict counters == runs), the SYN case really makes a new flow per run (its
per-run variation mirrored in Python matches the kernel's), and the JSON has its keys.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench/ is run from the repository root, not installed

from bench import frames  # noqa: E402
from bench.cost import (OPS, TARGETS, CostBench, calibrate, make_cases,  # noqa: E402
                        run_cost)
from bench.maglev import plain_maglev, quality, run_maglev  # noqa: E402
from lb import layout  # noqa: E402
from lb import native  # noqa: E402

CASES = ("tcp_hit", "tcp_syn", "tcp_syn_limited", "udp_hit", "quic_short_cid", "ipv6_hit",
         "gue_hit",
         "icmp_error_v4", "icmp_error_v6", "echo_v4", "too_big_v4", "pass_v4", "pass_v6")
ICMP_PATHS = {"icmp_error_v4": "icmp_forwarded", "icmp_error_v6": "icmp_forwarded",
              "echo_v4": "echo_answered", "too_big_v4": "too_big_answered"}
REPEAT, SYN_REPEAT, ROUNDS = 1000, 1500, 2


@pytest.fixture(scope="module")
def cost(tmp_path_factory):
    out = tmp_path_factory.mktemp("cost")
    res = run_cost(out=str(out), repeat=REPEAT, syn_repeat=SYN_REPEAT, rounds=ROUNDS,
                   maglev_builds=2, quiet=True, calib_repeat=0)
    return out, res


def test_cost_json_has_required_keys(cost):
    out, res = cost
    on_disk = json.loads((out / "cost.json").read_text())
    assert on_disk == json.loads(json.dumps(res))
    assert set(CASES) == set(on_disk["cases"])
    assert on_disk["floor_ns"] > 0
    assert on_disk["maglev_build_ms"] > 0
    for key in ("kernel", "cpu_model", "cores", "date"):
        assert on_disk["machine"][key], key
    for name, c in on_disk["cases"].items():
        assert c["ns"] > 0 and math.isfinite(c["ratio"]) and c["ratio"] > 0, name
        assert isinstance(c["verdicts"], dict), name
        assert len(c["ns_all"]) == len(c["ratio_all"]) == ROUNDS
        assert c["target_ratio"] == TARGETS.get(name)


@pytest.mark.parametrize("name", CASES)
def test_every_run_took_the_named_path(cost, name):
    _, res = cost
    c = res["cases"][name]
    v = c["verdicts"]
    runs = (SYN_REPEAT if name.startswith("tcp_syn") else REPEAT) * ROUNDS
    assert v["runs"] == runs
    assert v["rx"] == runs
    assert v["aborted_or_other"] == 0
    assert v["drop"] == 0 and v["redirect"] == 0 and v["flow_moved"] == 0
    if name.startswith("pass"):
        assert v["pass"] == runs and v["tx"] == 0
        assert v["flow_hit"] == v["flow_miss"] == 0
    else:
        assert v["tx"] == runs and v["pass"] == 0
        if name == "tcp_syn":
            assert v["flow_miss"] == runs and v["flow_hit"] == 0
            assert v["flow_insert_limited"] == 0
            assert c["oldest_flow_kept"] is True
        elif name == "tcp_syn_limited":  # one insert per second may pass the limit
            assert v["flow_miss"] == runs and v["flow_hit"] == 0
            assert runs - 16 * ROUNDS <= v["flow_insert_limited"] <= runs
        elif name == "quic_short_cid":  # routed by its connection ID, table untouched
            assert v["quic_routed_by_cid"] == runs and v["quic_fallback"] == 0
            assert v["flow_hit"] == v["flow_miss"] == 0
            assert c["vs"]["case"] == "udp_hit" and c["vs"]["ratio"] > 0
        elif name in ICMP_PATHS:
            assert v[ICMP_PATHS[name]] == runs
            assert v["flow_hit"] == (runs if name == "too_big_v4" else 0)
            assert v["flow_miss"] == 0
        else:
            assert v["flow_hit"] == runs and v["flow_miss"] == 0
    if name == "gue_hit":
        assert v["gue_zero_csum"] == 0
    assert c["ok"] is True


def test_limited_syn_alone_passes_its_path_check(tmp_path):
    """A SYN over flow_insert_limit is by design not remembered: measured without tcp_syn,
    no "oldest flow kept" check may apply to it (it did, and failed every such run)."""
    res = run_cost(out=str(tmp_path), repeat=REPEAT, syn_repeat=SYN_REPEAT, rounds=ROUNDS,
                   maglev_builds=1, cases=["tcp_syn_limited"], quiet=True, calib_repeat=0)
    c = res["cases"]["tcp_syn_limited"]
    assert c["ok"] is True, c
    assert "oldest_flow_kept" not in c
    assert c["verdicts"]["flow_insert_limited"] >= SYN_REPEAT * ROUNDS - 16 * ROUNDS


def test_floor_runs_are_all_floor(cost):
    _, res = cost
    f = res["floor"]["verdicts"]
    assert f["runs"] == f["floor_tx"] > 0
    assert f["rx"] == 0  # the floor never entered lb
    assert res["floor"]["ok"] is True


def test_frames_are_valid_packets():
    """Checksums and lengths right (scapy rebuilds them from scratch and gets our bytes)."""
    scapy = pytest.importorskip("scapy.all")
    for c in make_cases():
        assert len(c.frame) % 8 == 0 and len(c.frame) <= frames.TMPL_MAX
        pkt = scapy.Ether(c.frame)
        if scapy.IP in pkt:
            del pkt[scapy.IP].chksum
            del pkt[scapy.IP].len
        else:
            del pkt[scapy.IPv6].plen
        # the outermost L4 header (an ICMP error quotes another, kept as it is)
        l4 = (pkt[scapy.IP] if scapy.IP in pkt else pkt[scapy.IPv6]).payload
        delattr(l4, "chksum" if any(f.name == "chksum" for f in l4.fields_desc) else "cksum")
        assert bytes(pkt) == c.frame, c.name


def test_syn_variation_mirrors_the_kernel():
    """bench_restore's per-run source port / address writes equal frames.vary, so the
    runner can name the flow a given run created; and consecutive runs are distinct flows."""
    cpu = sorted(os.sched_getaffinity(0))[-1]
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        with CostBench(backends=3, ring_size=251) as cb:
            syn = next(c for c in make_cases() if c.syn)
            cb.set_template(syn.frame, syn=True)
            cb.target.update_fd(ctypes.c_uint32(0), cb.floor_fd)
            keys = set()
            for _ in range(3):
                run = cb.bench_counters()[0][cpu] + 1
                r = native.test_run(cb.restore_fd, syn.frame)
                want = frames.vary(syn.frame, run, frames.V4_L4, frames.V4_SADDR_LO)
                # the floor swapped the MACs; everything after them is the template's
                assert r.data[12:] == want[12:]
                keys.add(bytes(layout.flow_key(*frames.parse_tuple(want))))
            assert len(keys) == 3
    finally:
        os.sched_setaffinity(0, old)


def test_vary_never_repeats_a_flow_across_16_bits():
    seen = {frames.vary(bytes(64), r, frames.V4_L4, frames.V4_SADDR_LO)[26:36] for r in
            list(range(1, 200)) + list(range(65530, 65600)) + [131072 + 5, 5 + 65536 * 7]}
    assert len(seen) == 199 + 70 + 2


def test_calibration_reports_every_primitive():
    res = calibrate(repeat=500, rounds=1, insert_repeat=20)
    assert set(res) == set(OPS)
    assert all(math.isfinite(v) for v in res.values())


def test_maglev_quality_small(tmp_path):
    res = run_maglev(out=str(tmp_path), ns=(5, 20), ms=(251,), trials=2, builds=1,
                     quiet=True, plain_max_m=251)
    on_disk = json.loads((tmp_path / "maglev.json").read_text())
    assert len(on_disk["rows"]) == 2
    assert (tmp_path / "maglev.png").stat().st_size > 1000
    for row in res["rows"]:
        n, m = row["n"], row["m"]
        assert row["max_slots"] >= m / n >= row["min_slots"]
        assert row["max_slots"] - row["min_slots"] <= 1  # equal weights: within one slot
        for label in ("remove_1", "remove_10pct"):
            r = row[label]
            assert r["extra_moved_mean"] >= 0 and r["removed"] >= 1
            # the removed backends' own slots always move: about k * M / N of them
            assert abs(r["own_slots_mean"] - r["removed"] * m / n) <= r["removed"]
        assert "plain_maglev" in row


def test_plain_maglev_fills_the_table():
    keys = [bytes([i, 0, 0, 0]) * 5 for i in range(1, 8)]
    t = plain_maglev(keys, 101)
    assert -1 not in t and set(t) == set(range(7))


def test_quality_disruption_counts_only_survivors():
    row = quality(10, 251, trials=1, builds=1)
    assert row["remove_1"]["own_slots_mean"] in (25, 26)


def test_cli_writes_json(tmp_path):
    p = subprocess.run([sys.executable, "-m", "bench", "--out", str(tmp_path), "cost",
                        "--repeat", "500", "--syn-repeat", "500", "--rounds", "1",
                        "--case", "tcp_hit", "--case", "pass_v4", "--calib-repeat", "0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "tcp_hit" in p.stdout
    res = json.loads((tmp_path / "cost.json").read_text())
    assert set(res["cases"]) == {"tcp_hit", "pass_v4"}
    assert res["cases"]["tcp_hit"]["verdicts"]["flow_hit"] == 500


def test_vipscale_runner(tmp_path):
    """bench/vipscale.py on small counts: well-formed JSON, every measured run a flow-table
    hit on both sides, and the summary takes its ratio as vip_scaling_10000's value only
    for 1 vs 10,000 VIPs."""
    from bench.summary import run_summary
    from bench.vipscale import run_vipscale

    doc = run_vipscale(out=str(tmp_path), n_hi=200, flows=1000, rounds=2, repeat=3000,
                       pairs=2, flow_table_size=65536, quiet=True)
    assert json.loads((tmp_path / "vipscale.json").read_text()) == json.loads(json.dumps(doc))
    assert doc["ok"] is True and doc["services"] == [1, 200] and doc["flows"] == 1000
    for side in ("lo", "hi", "hi_idle"):
        v = doc["verdicts"][side]
        assert v["rx"] == v["tx"] == v["flow_hit"] == 2 * 2 * 3000 and v["flow_miss"] == 0
    assert doc["ratio"] > 0 and doc["idle_vips_ratio"] > 0 and len(doc["ratio_by_pair"]) == 2
    assert all(len(p["ratio_all"]) == 2 for p in doc["pairs"])
    s = run_summary(str(tmp_path), quiet=True)
    assert s["vip_scaling_10000"]["value"] is None  # 200 VIPs is not the headline setup


def test_summary_has_quic_vs_udp_hit(cost):
    """make bench's summary reports quic_short_cid / udp_hit from cost.json."""
    from bench.summary import run_summary
    out, res = cost
    s = run_summary(str(out), quiet=True)
    q = s["quic_vs_udp_hit"]
    assert q["value"] == res["cases"]["quic_short_cid"]["vs"]["ratio"] and q["path_ok"] is True
    assert "quic_vs_udp_hit" in (out / "summary.md").read_text()


def test_summary_states_the_memory_budget():
    """The summary sets the machine's cost of one uncached read of a flow's slot beside
    what the new-flow targets leave for a new flow's whole work."""
    from bench.summary import memory_budget, memory_line
    co = {"floor_ns": 50.0, "primitives_ns": {"random_read_64mb": 150.0}}
    mem = memory_budget(co, {"floor_per_core_mpps": 4.0})
    assert mem["random_read_in_floors"] == 3.0
    assert mem["tcp_syn_budget_ns"] == 250.0  # a SYN at 6x: 5 floors beyond the floor
    assert mem["new_flow_budget_ns"] == 150.0  # 400 ns at 2.5 Mpps, 250 ns at the floor
    assert "150 ns, 3.0x" in memory_line(mem)
    assert memory_budget({"floor_ns": 50.0}, None) is None  # calibration skipped
    assert "new_flow" not in memory_line(memory_budget(co, None))
