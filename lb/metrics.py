"""Prometheus exposition of the stats document on `metrics_listen` (GET /metrics).

The text comes from prometheus-client: a collector turns each scrape's stats document into
metric families, rendered by `generate_latest` from a registry of our own (the library's
global one would also export its process and platform collectors)."""

from __future__ import annotations

import asyncio
from typing import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .boundedserver import BoundedServer

STATES = ("active", "drain", "maint", "down")
VERDICTS = (("rx", "rx_packets"), ("tx", "tx"), ("redirect", "redirect"), ("pass", "pass"),
            ("drop", "drop"))
ICMP_ACTIONS = (("forwarded", "icmp_forwarded"), ("too_big_answered", "too_big_answered"),
                ("too_big_limited", "too_big_limited"), ("echo_answered", "echo_answered"))
# Single global counters: metric name, stats key, help text.
COUNTERS = (
    ("xdplb_flow_insert_limited", "flow_insert_limited",
     "Packets of new flows forwarded without a connection-table entry "
     "(over lb.flow_insert_limit)."),
    ("xdplb_flow_evictions", "flow_evictions",
     "Connection-table entries given up for new flows' (their bucket was full; the "
     "least recently used went)."),
    ("xdplb_flow_insert_raced", "flow_insert_raced",
     "New flows forwarded but not remembered: another CPU was writing the same "
     "connection-table bucket at that moment."),
    ("xdplb_other_host_passed", "other_host_passed",
     "Frames for a VIP addressed to another host's MAC (a flooding switch), passed "
     "to the kernel, not forwarded."),
)
VIP_LABELS = ("vip", "address", "port", "protocol")
BACKEND_LABELS = ("vip", "backend")


class StatsCollector:
    """Metric families of one stats document, read anew at every scrape."""

    def __init__(self, snapshot: Callable[[], dict]):
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        doc = self.snapshot()
        g = doc["global"]
        m = CounterMetricFamily("xdplb_packets", "Packets seen by the XDP program, by verdict.",
                                labels=("verdict",))
        for verdict, key in VERDICTS:
            m.add_metric((verdict,), g[key])
        yield m
        m = CounterMetricFamily("xdplb_flow_table", "Connection-table lookups by result.",
                                labels=("result",))
        for result, key in (("hit", "flow_hits"), ("miss", "flow_misses"),
                            ("moved", "flow_moved")):
            m.add_metric((result,), g.get(key, 0))
        yield m
        for name, key, doc_text in COUNTERS:
            yield CounterMetricFamily(name, doc_text, value=g.get(key, 0))
        m = CounterMetricFamily(
            "xdplb_quic", "QUIC short-header packets to QUIC VIPs: sent to the backend their "
            "connection ID names, or not routable by it and balanced as UDP flows.",
            labels=("result",))
        for result in ("routed_by_cid", "fallback"):
            m.add_metric((result,), g.get(f"quic_{result}", 0))
        yield m
        m = CounterMetricFamily(
            "xdplb_icmp", "ICMP handled for VIPs: errors forwarded to a flow's backend, "
            "too-big answers sent and held back by the rate limit, echo requests answered.",
            labels=("action",))
        for action, key in ICMP_ACTIONS:
            m.add_metric((action,), g.get(key, 0))
        yield m
        m = CounterMetricFamily("xdplb_drops", "Dropped packets by reason.", labels=("reason",))
        for reason, n in g["drops"].items():
            m.add_metric((reason,), n)
        yield m

        vips = doc["vips"]
        vip_labels = [(v["name"], v["address"], str(v["port"]), v["protocol"]) for v in vips]
        for name, key, help_ in (("vip_packets", "packets", "Packets for a VIP."),
                                 ("vip_bytes", "bytes", "Bytes for a VIP (frames as received).")):
            m = CounterMetricFamily(f"xdplb_{name}", help_, labels=VIP_LABELS)
            for labels, v in zip(vip_labels, vips):
                m.add_metric(labels, v[key])
            yield m

        announcing = [(labels, v) for labels, v in zip(vip_labels, vips) if "announced" in v]
        if announcing:
            m = GaugeMetricFamily("xdplb_vip_announced",
                                  "1 while the VIP's address is announced (its route is in "
                                  "the [announce] table).", labels=VIP_LABELS)
            for labels, v in announcing:
                m.add_metric(labels, int(v["announced"]))
            yield m

        pairs = [((v["name"], b["address"]), b) for v in vips for b in v["backends"]]
        for name, key, help_ in (("backend_packets", "packets", "Packets sent to a backend."),
                                 ("backend_bytes", "bytes", "Bytes sent to a backend.")):
            m = CounterMetricFamily(f"xdplb_{name}", help_, labels=BACKEND_LABELS)
            for labels, b in pairs:
                m.add_metric(labels, b[key])
            yield m
        m = GaugeMetricFamily("xdplb_backend_healthy",
                              "1 when the backend passes its health checks.",
                              labels=BACKEND_LABELS)
        for labels, b in pairs:
            m.add_metric(labels, int(bool(b["healthy"])))
        yield m
        m = GaugeMetricFamily("xdplb_backend_nexthop_resolved",
                              "1 when packets to the backend can leave (its next hop has a "
                              "MAC); 0: they are dropped as no_nexthop.",
                              labels=BACKEND_LABELS)
        for labels, b in pairs:
            m.add_metric(labels, int(b.get("nexthop") != "unresolved"))
        yield m
        m = GaugeMetricFamily("xdplb_backend_state",
                              "Effective state of a backend (1 for the current one).",
                              labels=(*BACKEND_LABELS, "state"))
        for labels, b in pairs:
            for s in STATES:
                m.add_metric((*labels, s), int(b["state"] == s))
        yield m


def render(doc: dict) -> bytes:
    """The exposition text of one stats document."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(lambda: doc))
    return generate_latest(registry)


class MetricsServer:
    """GET /metrics. Anyone who can reach metrics_listen may connect: at most
    MAX_CONNECTIONS at once, each for CONNECTION_S at most (lb/boundedserver.py), so
    idle clients cannot take the descriptors health checks need."""

    MAX_CONNECTIONS = 64
    CONNECTION_S = 5.0

    def __init__(self, snapshot: Callable[[], dict], host: str, port: int, log=None):
        self.host, self.port = host, port
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StatsCollector(snapshot))
        self.server = BoundedServer(self._client, host, port, limit=self.MAX_CONNECTIONS,
                                    deadline=self.CONNECTION_S, log=log)

    async def start(self) -> None:
        await self.server.start()

    async def close(self) -> None:
        await self.server.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            parts = head.split(b" ", 2)
            ctype = "text/plain"
            if len(parts) < 2 or parts[0] != b"GET":
                status, body = "405 Method Not Allowed", b"GET only\n"
            elif parts[1].split(b"?")[0] not in (b"/metrics", b"/"):
                status, body = "404 Not Found", b"see /metrics\n"
            else:
                status, body, ctype = "200 OK", generate_latest(self.registry), \
                    CONTENT_TYPE_LATEST
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                         + body)
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError,
                asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
