"""QUIC in the lab, with aioquic: a backend's server whose connection IDs carry its server
ID in the QUIC-LB plaintext layout (what a QUIC VIP routes by), and a client that can move
to a new local port mid-connection (a migration, or a NAT rebinding as the LB sees it).

Server, in a backend's namespace (answers every request stream with its name):
    python -m lb.lab.quic NAME --server-id N --port PORT --vip ADDR [--vip ADDR ...]
        [--ready PATH]
Client: QuicClient(sock, (vip, port)); handshake(), ask() -> the backend's name,
migrate(new_sock), close(). Sans-IO (aioquic's QuicConnection driven here), so the test
decides which socket each datagram leaves by.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import socket
import ssl
import time
from functools import partial
from typing import Callable, Optional

from aioquic.asyncio import QuicConnectionProtocol, serve
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection, QuicConnectionId
from aioquic.quic.events import (ConnectionTerminated, HandshakeCompleted, QuicEvent,
                                 StreamDataReceived)
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ALPN = "xdplb-lab"
SID_LEN, CID_LEN = 2, 8  # the lab's QUIC VIPs: quic_server_id_len, quic_cid_len
CONFIG_ID = 0            # top 3 bits of a connection ID's first octet (7: not routable)


class LayoutCids:
    """Connection IDs in the QUIC-LB plaintext layout: first octet (config id in its top
    3 bits, random low bits), the server ID big endian, random nonce bytes."""

    def __init__(self, server_id: int, sid_len: int = SID_LEN, cid_len: int = CID_LEN):
        self.sid = server_id.to_bytes(sid_len, "big")
        self.nonce_len = cid_len - 1 - sid_len

    def new(self) -> bytes:
        first = CONFIG_ID << 5 | os.urandom(1)[0] & 0x1F
        return bytes([first]) + self.sid + os.urandom(self.nonce_len)

    def issue_for(self, conn: QuicConnection) -> None:
        """Make `conn` (a server connection, before its first datagram is sent) issue
        only IDs of this layout. aioquic draws its IDs from os.urandom and has no hook
        for it: its first ID is replaced before the server registers it, and the ones it
        issues later (NEW_CONNECTION_ID) come from _replenish below."""
        first = conn._host_cids[0]
        first.cid = self.new()
        conn.host_cid = conn._local_initial_source_connection_id = first.cid
        conn._replenish_connection_ids = partial(self._replenish, conn)

    def _replenish(self, conn: QuicConnection) -> None:
        # as QuicConnection._replenish_connection_ids, with our IDs
        while len(conn._host_cids) < min(8, conn._remote_active_connection_id_limit):
            conn._host_cids.append(QuicConnectionId(cid=self.new(),
                                                    sequence_number=conn._host_cid_seq,
                                                    stateless_reset_token=os.urandom(16)))
            conn._host_cid_seq += 1


def self_signed() -> tuple:
    """A throwaway certificate and key (the client does not verify them)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "xdplb-lab")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .sign(key, hashes.SHA256()))
    return cert, key


class _NameAnswer(QuicConnectionProtocol):
    """Answers each request stream with the backend's name."""

    def __init__(self, quic: QuicConnection, stream_handler=None, *, name: bytes,
                 cids: LayoutCids):
        cids.issue_for(quic)
        super().__init__(quic, stream_handler)
        self.name = name

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamDataReceived) and event.end_stream:
            self._quic.send_stream_data(event.stream_id, self.name, end_stream=True)


async def _serve(name: str, server_id: int, port: int, vips: list[str],
                 ready: Optional[str]) -> None:
    cert, key = self_signed()
    cfg = QuicConfiguration(is_client=False, alpn_protocols=[ALPN],
                            connection_id_length=CID_LEN, certificate=cert, private_key=key)
    proto = partial(_NameAnswer, name=name.encode(), cids=LayoutCids(server_id))
    for vip in vips:  # each VIP bound apart: answers leave from the VIP (DSR)
        await serve(vip, port, configuration=cfg, create_protocol=proto)
    if ready:
        with open(ready, "w") as f:
            f.write(str(os.getpid()))
    await asyncio.Event().wait()


class QuicClient:
    """One client connection to (vip, port) over `sock`, a UDP socket of the client."""

    def __init__(self, sock: socket.socket, server: tuple[str, int]):
        cfg = QuicConfiguration(is_client=True, alpn_protocols=[ALPN],
                                verify_mode=ssl.CERT_NONE, server_name="xdplb-lab")
        if sock.family == socket.AF_INET6:  # as recvfrom gives it, so the answers match
            server = (server[0], server[1], 0, 0)
        self.sock, self.server = sock, server
        self.conn = QuicConnection(configuration=cfg)
        self.conn.connect(server, now=time.monotonic())
        self.closed = False

    @property
    def dcid(self) -> bytes:
        """The connection ID this client puts in its short headers now."""
        return self.conn._peer_cid.cid

    def _pump(self, done: Callable[[QuicEvent], bool], timeout: float) -> bool:
        """Exchange datagrams until an event satisfies `done` (True) or `timeout` passes
        or the connection ends (False)."""
        deadline = time.monotonic() + timeout
        while True:
            for data, addr in self.conn.datagrams_to_send(now=time.monotonic()):
                self.sock.sendto(data, addr)
            while (ev := self.conn.next_event()) is not None:
                if isinstance(ev, ConnectionTerminated):
                    self.closed = True
                    return False
                if done(ev):
                    return True
            now = time.monotonic()
            if now >= deadline:
                return False
            timer = self.conn.get_timer()
            self.sock.settimeout(max(min(deadline, timer or deadline) - now, 0.001))
            try:
                data, addr = self.sock.recvfrom(65536)
                self.conn.receive_datagram(data, addr, now=time.monotonic())
            except socket.timeout:
                if timer is not None and time.monotonic() >= timer:
                    self.conn.handle_timer(now=time.monotonic())

    def handshake(self, timeout: float = 3.0) -> bool:
        return self._pump(lambda ev: isinstance(ev, HandshakeCompleted), timeout)

    def ask(self, timeout: float = 2.0) -> Optional[str]:
        """One request stream; the name of the backend that answered, None if none did."""
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_stream_data(sid, b"who?", end_stream=True)
        got = bytearray()

        def answered(ev: QuicEvent) -> bool:
            if isinstance(ev, StreamDataReceived) and ev.stream_id == sid:
                got.extend(ev.data)
                return ev.end_stream
            return False
        return got.decode() if self._pump(answered, timeout) else None

    def migrate(self, sock: socket.socket) -> None:
        """Go on from `sock` (another local port): the old socket is closed, and the
        next packets carry a new connection ID the server issued, as a migrating client
        does (RFC 9000 9.5)."""
        self.sock.close()
        self.sock = sock
        self.conn.change_connection_id()

    def close(self) -> None:
        if not self.closed:
            self.conn.close()
            for data, addr in self.conn.datagrams_to_send(now=time.monotonic()):
                self.sock.sendto(data, addr)
        self.sock.close()


def main(argv: Optional[list] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lb.lab.quic")
    p.add_argument("name")
    p.add_argument("--server-id", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--vip", action="append", required=True)
    p.add_argument("--ready", help="file written with the pid once listening")
    a = p.parse_args(argv)
    asyncio.run(_serve(a.name, a.server_id, a.port, a.vip, a.ready))


if __name__ == "__main__":
    main()
