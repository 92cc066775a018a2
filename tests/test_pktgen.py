"""The packet-rate runner (bench/pktgen.py and the modules it uses, bench/iptables.py,
bench/summary.py) on small counts: real BPF, real namespaces, no timing assertions.

Checked: bench_gen writes exactly the frames the Python mirror predicts (fields varied,
IPv4 header and TCP/UDP checksums valid, any frame length); its config struct matches the
object's BTF; in the veth lab every generated frame is received by the program under test
and counted by the sink when nothing is dropped, and xdplb's counters name the path (hit,
new flow, redirect); the runners write well-formed JSON; the kube-proxy rule set loads and
DNATs what it should (conntrack entries, every frame to the sink).
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import struct
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench/ is run from the repository root, not installed

from bench import frames, iptables  # noqa: E402
from bench.benchobj import B_GEN, BenchObject  # noqa: E402
from bench.kernel_pktgen import KernelPktgen  # noqa: E402
from bench.pktgen import make_cases, run_pktgen  # noqa: E402
from bench.pktlab import MAC, PktLab  # noqa: E402
from bench.runner import LbSetup, Runner, lb_vips, pick_cpus  # noqa: E402
from bench.summary import run_summary  # noqa: E402
from bench.traffic import (SRC6, VIP6, GenCfg, GenField, Traffic,  # noqa: E402
                           expected_frame)
from lb import native  # noqa: E402

from tests.test_layout import BENCH_OBJ, compare  # noqa: E402

COUNT = 5000


def _csum_ok(data: bytes) -> bool:
    return frames.checksum(data) == 0


def _checksums_valid(frame: bytes) -> bool:
    """IPv4 header checksum and TCP/UDP checksum over pseudo header + segment."""
    etype = struct.unpack_from("!H", frame, 12)[0]
    if etype == 0x0800:
        if not _csum_ok(frame[14:34]):
            return False
        proto, l4 = frame[23], 34
        seg = frame[l4:14 + struct.unpack_from("!H", frame, 16)[0]]
        pseudo = frame[26:34] + struct.pack("!BBH", 0, proto, len(seg))
    else:
        proto, l4 = frame[20], 54
        seg = frame[l4:l4 + struct.unpack_from("!H", frame, 18)[0]]
        pseudo = frame[22:54] + struct.pack("!IxxxB", len(seg), proto)
    return _csum_ok(pseudo + seg)


@pytest.fixture(scope="module")
def bench_skel():
    sk = BenchObject()
    yield sk
    sk.close()


def test_gen_cfg_mirror_matches_btf():
    compare(BENCH_OBJ, "bench_gen_cfg", GenCfg)
    compare(BENCH_OBJ, "bench_gen_field", GenField)


TRAFFIC = [
    Traffic("v4_new_spread", flows=0, vips=7),
    Traffic("v4_hit_many", flows=200_000, vips=3),
    Traffic("v6_udp_hit", dst=VIP6, src=SRC6, proto=17, size=96, flows=100),
    Traffic("v6_new", dst=VIP6, src=SRC6, size=80, flows=0),
    Traffic("v4_udp_300B", proto=17, size=300, flows=50, vips=2),
    Traffic("v4_odd_61B", size=61, flows=0),
]


@pytest.mark.parametrize("t", TRAFFIC, ids=[t.name for t in TRAFFIC])
def test_bench_gen_writes_valid_varied_frames(bench_skel, t):
    """Plain BPF_PROG_TEST_RUN of bench_gen (data comes back): every frame is the
    Python mirror's, with valid checksums, on the run counter the kernel used."""
    sk = bench_skel
    frame = t.frame(MAC["g0"], MAC["l0"])
    sk.set_template(frame[:min(len(frame) // 8 * 8, frames.TMPL_MAX)])
    cfg = t.gen_cfg()
    sk.set_gen_cfg(cfg)
    cpu = sorted(os.sched_getaffinity(0))[-1]
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        seen = set()
        for _ in range(40):
            r = native.test_run(sk.prog_fd("bench_gen"), frame)
            run = sk.stat(B_GEN)[cpu]
            assert r.verdict == "tx"
            assert len(r.data) == len(frame)
            assert r.data == expected_frame(frame, cfg, run, cpu), f"run {run}"
            assert _checksums_valid(r.data), f"run {run}"
            seen.add(frames.parse_tuple(r.data))
    finally:
        os.sched_setaffinity(0, old)
    if t.new_flows or t.distinct_flows() >= 40:
        assert len(seen) == 40  # a flow per frame
    dsts = {s[3] for s in seen}
    assert len(dsts) == min(t.vips, 40)


def test_distinct_flows_and_spread():
    t = Traffic("x", flows=20_000, vips=10_000)
    assert t.distinct_flows() == 20_000
    assert Traffic("y", flows=100_000).distinct_flows() == 129_024  # 2 x 64512 ports
    assert Traffic("z", flows=0).distinct_flows() == 0
    with pytest.raises(ValueError):
        Traffic("w", dst=ipaddress.ip_address("10.96.255.250"), vips=10).gen_cfg()


# --- the veth lab --------------------------------------------------------------------
@pytest.fixture(scope="module")
def lab():
    with PktLab(prefix="xt") as lab:
        yield lab


@pytest.fixture(scope="module")
def lbs(lab):
    s = LbSetup(lab, flow_table_size=65536, max_vips=64, max_backends=1024)
    yield s
    s.close()


def _runner(lab, dp=None):
    return Runner(lab, dp, pick_cpus(1), count=COUNT, min_count=COUNT,
                    probe_count=COUNT)


def test_floor_every_frame_forwarded_and_counted(lab):
    r = _runner(lab)
    s = r.once("floor", lab.prog("bench_floor"), Traffic("f", flows=64), COUNT)
    c = s.counts
    assert c["gen"] == COUNT
    assert c["floor_tx"] == COUNT
    assert c["sink"] == COUNT          # nothing dropped: the sink saw every frame
    assert c["sink_bytes"] == COUNT * 64
    assert s.busy > 0 and s.wall > 0 and s.per_core_mpps > 0


@pytest.mark.parametrize("case", ["hit", "syn", "ipv6", "gue", "redirect"])
def test_xdplb_paths_sink_equals_generated(lab, lbs, case):
    c = next(x for x in make_cases(flows=256) if x.name == case)
    lbs.configure(c.encap, c.tx_mode)
    lbs.apply(lb_vips(backends=8, ring_size=1009), c.tx_mode)
    r = _runner(lab, lbs.dp)
    s = r.measure("xdplb", lbs.dp.prog_fd, c.traffic)  # warm-up first (flows in table)
    k = s.counts
    assert k["gen"] == COUNT
    assert k["rx"] == COUNT
    assert k["sink"] == COUNT
    for name in c.expect:
        assert k[name] == COUNT, (name, k)
    for name in c.zero:
        assert k[name] == 0, (name, k)
    outer = {"hit": 20, "syn": 20, "ipv6": 40, "gue": 28, "redirect": 20}[case]
    assert k["sink_bytes"] == COUNT * (c.traffic.size + outer)


def test_nonvip_goes_through_the_stack(lab, lbs):
    c = next(x for x in make_cases() if x.name == "nonvip")
    lbs.apply(lb_vips(backends=8, ring_size=1009))
    r = _runner(lab, lbs.dp)
    s = r.measure("xdplb", lbs.dp.prog_fd, c.traffic)
    assert s.counts["pass"] == s.counts["rx"] == COUNT
    assert s.counts["sink"] == COUNT  # the LB's kernel forwarded every one


@pytest.fixture(scope="module")
def outdir(tmp_path_factory):
    return tmp_path_factory.mktemp("bench")


def test_run_pktgen_json(lab, outdir):
    doc = run_pktgen(out=str(outdir), rounds=1, count=3000, lab=lab, quiet=True,
                       flow_table_size=65536, plot=True)
    on_disk = json.loads((outdir / "pktgen.json").read_text())
    assert on_disk["cases"].keys() == doc["cases"].keys()
    assert {"hit", "syn", "nonvip", "ipv6", "gue", "redirect"} <= set(on_disk["cases"])
    for key in ("kernel", "cpu_model", "cores", "date"):
        assert on_disk["machine"][key], key
    assert on_disk["params"]["flow_table_fill"]["flows_inserted"] == 65536
    for name, c in on_disk["cases"].items():
        assert c["ok"] and c["floor_ok"], name
        assert c["loss"] == 0, name
        assert c["counters"]["gen"] == c["counters"]["sink"] == 3000 * c["threads"], name
        for k in ("offered_mpps", "forwarded_mpps", "per_core_mpps", "floor_per_core_mpps",
                  "ratio", "ns_over_floor", "ns_per_pkt"):
            assert isinstance(c[k], (int, float)) and math.isfinite(c[k]), (name, k)
    assert on_disk["cases"]["nonvip"]["stack_per_core_mpps"] > 0
    assert (outdir / "pktgen.png").stat().st_size > 1000


# --- iptables ----------------------------------------------------------------------------
def test_kube_proxy_rules_shape():
    text = iptables.kube_proxy_rules(3, endpoints=2)
    assert text.count("-A KUBE-SERVICES -d ") == 3
    assert text.count("-m statistic --mode random --probability 0.50000000000") == 3
    assert text.count("-j DNAT --to-destination") == 6
    assert text.count(":KUBE-SVC-") == 3 and text.count(":KUBE-SEP-") == 6
    assert text.rstrip().endswith("COMMIT")


@pytest.fixture(scope="module")
def sweep(lab, outdir):
    iptables.run_sweep(out=str(outdir), services=(1, 10000), rounds=1, count=1000, quiet=True,
                lab=lab, flow_table_size=65536, est_flows=10000, scaling_rounds=2)
    return json.loads((outdir / "iptables.json").read_text())


def test_sweep_json_and_dnat(lab, sweep, outdir):
    """The services' addresses have no route in the LB namespace (only the endpoints'
    network has, towards the sink): an iptables frame reaches the sink only DNAT'd."""
    assert [p["services"] for p in sweep["points"]] == [1, 10000]
    assert sweep["iptables"] in ("iptables-nft", "iptables-legacy")
    for p in sweep["points"]:
        # filter: 4 rules; nat: 7 fixed + per service 1 + 2 endpoints x (1 + 2)
        assert p["iptables_rules"] == 4 + 7 + p["services"] * 7
        assert p["conntrack_entries_max_new"] >= 1000  # every new connection tracked
        for kind in ("new", "est"):
            for who in ("xdplb", "iptables"):
                c = p[kind][who]["counters"]
                assert c["gen"] == c["sink"] == 1000, (p["services"], kind, who, c)
                assert p[kind][who]["loss"] == 0
            x = p[kind]["xdplb"]["counters"]
            assert x["rx"] == x["tx"] == 1000
            assert x["flow_miss" if kind == "new" else "flow_hit"] == 1000
            assert p[kind]["xdplb_over_iptables"] > 0
    for kind in ("est", "new"):  # 1 vs 10,000 VIPs side by side: every packet on its path
        v = sweep["vip_scaling"][kind]
        assert v["services"] == [1, 10000] and v["path_ok"] is True
        assert len(v["ratio_ns_over_floor_all"]) == 2
    assert (outdir / "iptables.png").stat().st_size > 1000
    # the LB namespace is left without rules or conntrack entries
    assert iptables.conntrack_count(lab.lb) == 0


def test_summary_from_the_runs(sweep, outdir):
    s = run_summary(str(outdir), quiet=True)
    on_disk = json.loads((outdir / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(s))
    for key in ("forward_ratio_hit", "iptables_ratio_1000", "vip_scaling_10000",
                "maglev_max_mean_1000"):
        assert key in on_disk and "target" in on_disk[key]
    f = on_disk["forward_ratio_hit"]
    assert f["value"] > 0 and f["xdplb_per_core_mpps"] > 0 and f["floor_per_core_mpps"] > 0
    v = on_disk["vip_scaling_10000"]
    # no vipscale.json here: the live-frames figure stands in
    assert v["value"] == v["live_frames_ratio_over_floor"] is not None
    assert on_disk["iptables_ratio_1000"]["value"] is None  # no 1,000 point in this run
    assert on_disk["maglev_max_mean_1000"]["missing"]       # no maglev.json here
    assert "| forward_ratio_hit" in (outdir / "summary.md").read_text()


def test_kernel_pktgen_plan():
    t = Traffic("u", proto=17, flows=100, vips=4)
    plan = KernelPktgen.plan("g0", t, 1000, [0, 1], MAC["l0"], rate=2e6)
    assert plan[0] == ("pgctrl", "reset") and plan[-1] == ("pgctrl", "start")
    assert ("kpktgend_1", "add_device g0@1") in plan
    assert ("g0@0", "dst_max 10.96.0.13") in plan
    assert ("g0@1", "ratep 1000000") in plan
    assert ("g0@0", "udp_src_max 1123") in plan
    with pytest.raises(ValueError):
        KernelPktgen.plan("g0", Traffic("t"), 10, [0], MAC["l0"])
    r = KernelPktgen.parse_result(
        "Result: OK: 1000(c990+d10) usec, 100000 (64byte,0frags)\n  100000pps 51Mb/sec "
        "(51200000bps) errors: 0\n")
    assert r == {"ok": True, "usec": 1000, "packets": 100000, "pps": 100000, "errors": 0}
