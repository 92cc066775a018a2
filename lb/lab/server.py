"""A lab backend: an HTTP server that answers with its name (and, after a request body,
its length) and a UDP echo that prefixes its name, on every address of its namespace
(the VIPs sit on its `lo`); optionally a line echo over TCP for long-lived connections
(each line comes back as "NAME LINE").
Used by `xdplb lab up`; run as
`python -m lb.lab.server NAME --http PORT --udp PORT [--echo PORT] [--vip ADDR ...]`."""

from __future__ import annotations

import argparse
import asyncio
import socket


class Echo(asyncio.DatagramProtocol):
    def __init__(self, name: str):
        self.name = name.encode()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        self.transport.sendto(self.name + b" " + data, addr)


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-length" and value.strip().isdigit():
            return int(value)
    return 0


def _http_handler(name: str, health: dict):
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            req = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            path = req.split(b" ", 2)[1].decode() if req.count(b" ") >= 2 else "/"
            status = health["status"] if path == "/healthz" else 200
            body = f"{name}\n".encode()
            length = _content_length(req)
            if length:  # an upload: answered once all of it has arrived
                await asyncio.wait_for(reader.readexactly(length), 30)
                body = f"{name}\n{length}\n".encode()
            writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
    return handle


def _line_echo(name: str):
    prefix = name.encode() + b" "

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                writer.write(prefix + line)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
    return handle


async def serve(name: str, http_port: int, udp_port: int, vips: list[str],
                echo_port: int = 0) -> None:
    """HTTP (and the TCP line echo) on every address; UDP echo bound to each VIP, so
    replies leave from the VIP (a wildcard UDP socket would answer from the interface
    address)."""
    loop = asyncio.get_running_loop()
    health = {"status": 200}
    servers = []
    for fam, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        servers.append(await asyncio.start_server(_http_handler(name, health), host=host,
                                                  port=http_port, family=fam,
                                                  reuse_address=True))
        if echo_port:
            servers.append(await asyncio.start_server(_line_echo(name), host=host,
                                                      port=echo_port, family=fam,
                                                      reuse_address=True))
    for vip in vips:
        fam = socket.AF_INET6 if ":" in vip else socket.AF_INET
        sock = socket.socket(fam, socket.SOCK_DGRAM)
        sock.bind((vip, udp_port))
        await loop.create_datagram_endpoint(lambda: Echo(name), sock=sock)
    await asyncio.Event().wait()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("name")
    p.add_argument("--http", type=int, default=80)
    p.add_argument("--udp", type=int, default=5353)
    p.add_argument("--echo", type=int, default=0,
                   help="TCP port of a line echo (long-lived connections); 0: none")
    p.add_argument("--vip", action="append", default=[], help="VIP address for the UDP echo")
    a = p.parse_args()
    try:
        asyncio.run(serve(a.name, a.http, a.udp, a.vip, a.echo))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
