"""The Prometheus exposition of a stats document: names, types, labels and values, and
nothing but ours (a private registry: no process_ or python_ collectors)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from lb.metrics import render

DOC = {
    "vips": [{"name": "web", "address": "10.200.1.10", "port": 80, "protocol": "tcp",
              "packets": 12, "bytes": 3456,
              "backends": [{"address": "10.200.0.11", "state": "active", "healthy": True,
                            "packets": 5, "bytes": 600},
                           {"address": "fd00::1", "state": "drain", "healthy": False,
                            "packets": 0, "bytes": 0}]},
             {"name": 'odd"name\\', "address": "::1", "port": 0, "protocol": "udp",
              "packets": 2, "bytes": 90, "backends": []}],
    "global": {"rx_packets": 100, "tx": 50, "redirect": 3, "pass": 40, "drop": 10,
               "flow_hits": 7, "flow_misses": 3, "flow_moved": 1, "flow_insert_limited": 4,
               "icmp_forwarded": 5, "too_big_answered": 6, "too_big_limited": 1,
               "echo_answered": 2, "other_host_passed": 8, "quic_routed_by_cid": 8,
               "quic_fallback": 9,
               "drops": {"no_backend": 10, "malformed": 0}},
}

VIP = ("address", "port", "protocol", "vip")
BACKEND = ("backend", "vip")
FAMILIES = {  # name in the text -> (type, label names)
    "xdplb_packets_total": ("counter", ("verdict",)),
    "xdplb_flow_table_total": ("counter", ("result",)),
    "xdplb_flow_insert_limited_total": ("counter", ()),
    "xdplb_flow_evictions_total": ("counter", ()),
    "xdplb_flow_insert_raced_total": ("counter", ()),
    "xdplb_other_host_passed_total": ("counter", ()),
    "xdplb_icmp_total": ("counter", ("action",)),
    "xdplb_quic_total": ("counter", ("result",)),
    "xdplb_drops_total": ("counter", ("reason",)),
    "xdplb_vip_packets_total": ("counter", VIP),
    "xdplb_vip_bytes_total": ("counter", VIP),
    "xdplb_backend_packets_total": ("counter", BACKEND),
    "xdplb_backend_bytes_total": ("counter", BACKEND),
    "xdplb_backend_healthy": ("gauge", BACKEND),
    "xdplb_backend_nexthop_resolved": ("gauge", BACKEND),
    "xdplb_backend_state": ("gauge", (*BACKEND, "state")),
}


def test_exposition_names_types_labels_values():
    text = render(DOC).decode()
    types = {line.split()[2]: line.split()[3] for line in text.splitlines()
             if line.startswith("# TYPE ")}
    assert types == {name: kind for name, (kind, _) in FAMILIES.items()}
    samples = {}
    for f in text_string_to_metric_families(text):
        for s in f.samples:
            assert tuple(sorted(s.labels)) == tuple(sorted(FAMILIES[s.name][1])), s
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def value(name, **labels):
        return samples[(name, tuple(sorted(labels.items())))]
    assert [value("xdplb_packets_total", verdict=v) for v in
            ("rx", "tx", "redirect", "pass", "drop")] == [100, 50, 3, 40, 10]
    assert [value("xdplb_flow_table_total", result=r) for r in
            ("hit", "miss", "moved")] == [7, 3, 1]
    assert value("xdplb_flow_insert_limited_total") == 4
    assert value("xdplb_other_host_passed_total") == 8
    assert [value("xdplb_icmp_total", action=a) for a in
            ("forwarded", "too_big_answered", "too_big_limited", "echo_answered")] == [5, 6, 1, 2]
    assert value("xdplb_drops_total", reason="no_backend") == 10
    assert [value("xdplb_quic_total", result=r) for r in ("routed_by_cid", "fallback")] == [8, 9]
    assert value("xdplb_vip_bytes_total", vip="web", address="10.200.1.10", port="80",
                 protocol="tcp") == 3456
    assert value("xdplb_vip_packets_total", vip='odd"name\\', address="::1", port="0",
                 protocol="udp") == 2
    assert value("xdplb_backend_packets_total", vip="web", backend="10.200.0.11") == 5
    assert value("xdplb_backend_healthy", vip="web", backend="fd00::1") == 0
    states = {s: value("xdplb_backend_state", vip="web", backend="fd00::1", state=s)
              for s in ("active", "drain", "maint", "down")}
    assert states == {"active": 0, "drain": 1, "maint": 0, "down": 0}
