"""Prometheus text exposition of the stats document on `metrics_listen` (GET /metrics)."""

from __future__ import annotations

import asyncio
from typing import Callable

STATES = ("active", "drain", "maint", "down")


def _labels(**kv) -> str:
    def esc(v) -> str:
        return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in kv.items()) + "}"


def render(doc: dict) -> str:
    g = doc["global"]
    out = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, int]]) -> None:
        out.append(f"# HELP xdplb_{name} {help_}")
        out.append(f"# TYPE xdplb_{name} {kind}")
        out.extend(f"xdplb_{name}{labels} {value}" for labels, value in samples)

    metric("packets_total", "counter", "Packets seen by the XDP program, by verdict.",
           [(_labels(verdict=v), g[k]) for v, k in (("rx", "rx_packets"), ("tx", "tx"),
                                                   ("redirect", "redirect"), ("pass", "pass"),
                                                   ("drop", "drop"))])
    metric("flow_table_total", "counter", "Connection-table lookups by result.",
           [(_labels(result="hit"), g["flow_hits"]), (_labels(result="miss"), g["flow_misses"]),
            (_labels(result="moved"), g.get("flow_moved", 0))])
    metric("flow_insert_limited_total", "counter",
           "Packets of new flows forwarded without a connection-table entry "
           "(over lb.flow_insert_limit).",
           [("", g.get("flow_insert_limited", 0))])
    metric("drops_total", "counter", "Dropped packets by reason.",
           [(_labels(reason=r), n) for r, n in g["drops"].items()])
    vl = lambda v: dict(vip=v["name"], address=v["address"], port=v["port"],  # noqa: E731
                        protocol=v["protocol"])
    metric("vip_packets_total", "counter", "Packets for a VIP.",
           [(_labels(**vl(v)), v["packets"]) for v in doc["vips"]])
    metric("vip_bytes_total", "counter", "Bytes for a VIP (frames as received).",
           [(_labels(**vl(v)), v["bytes"]) for v in doc["vips"]])
    bl = [(v, b) for v in doc["vips"] for b in v["backends"]]
    metric("backend_packets_total", "counter", "Packets sent to a backend.",
           [(_labels(vip=v["name"], backend=b["address"]), b["packets"]) for v, b in bl])
    metric("backend_bytes_total", "counter", "Bytes sent to a backend.",
           [(_labels(vip=v["name"], backend=b["address"]), b["bytes"]) for v, b in bl])
    metric("backend_healthy", "gauge", "1 when the backend passes its health checks.",
           [(_labels(vip=v["name"], backend=b["address"]), int(bool(b["healthy"])))
            for v, b in bl])
    metric("backend_state", "gauge", "Effective state of a backend (1 for the current one).",
           [(_labels(vip=v["name"], backend=b["address"], state=s), int(b["state"] == s))
            for v, b in bl for s in STATES])
    return "\n".join(out) + "\n"


class MetricsServer:
    def __init__(self, snapshot: Callable[[], dict], host: str, port: int):
        self.snapshot, self.host, self.port = snapshot, host, port
        self.server = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._client, self.host, self.port)

    async def close(self) -> None:
        if self.server:
            self.server.close()
            await self.server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            parts = head.split(b" ", 2)
            if len(parts) < 2 or parts[0] != b"GET":
                status, body = "405 Method Not Allowed", b"GET only\n"
            elif parts[1].split(b"?")[0] not in (b"/metrics", b"/"):
                status, body = "404 Not Found", b"see /metrics\n"
            else:
                status, body = "200 OK", render(self.snapshot()).encode()
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                         + body)
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError,
                asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
