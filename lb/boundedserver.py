"""A TCP endpoint in the asyncio loop that other users cannot turn against the daemon's
descriptors (the metrics endpoint is open to anyone who can reach it):

- at most `limit` connections at once; beyond that the listener is not read, so further
  clients wait in the kernel's backlog and hold no descriptor of ours;
- each connection is closed `deadline` seconds after it was accepted, whatever it does
  (idle, slow to send its request, slow to read the answer);
- an accept that fails for want of descriptors or memory pauses accepting for PAUSE_S,
  logged once (metrics_accept_paused / metrics_accept_resumed), instead of asyncio's
  traceback on every attempt.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from typing import Awaitable, Callable, Optional

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
_SHORT_OF = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
PAUSE_S = 0.5


class BoundedServer:
    def __init__(self, handler: Handler, host: str, port: int, limit: int = 64,
                 deadline: float = 5.0, log=None):
        self.handler, self.host, self.port = handler, host, port
        self.limit, self.deadline, self.log = limit, deadline, log
        self.active = 0
        self.socks: list[socket.socket] = []
        self._reading = False
        self._paused: Optional[str] = None  # why accepting is paused
        self._tasks: set[asyncio.Task] = set()
        self._resume: Optional[asyncio.TimerHandle] = None

    async def start(self) -> None:
        """Listen on every address the host resolves to; OSError when one cannot be
        bound."""
        self.loop = asyncio.get_running_loop()
        infos = await self.loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM,
                                            flags=socket.AI_PASSIVE)
        try:
            for fam, _, _, _, addr in dict.fromkeys((i[0], 0, 0, "", i[4]) for i in infos):
                sock = socket.create_server(addr[:2], family=fam, backlog=128,
                                            dualstack_ipv6=False)
                self.socks.append(sock)
                sock.setblocking(False)
        except OSError:
            for sock in self.socks:
                sock.close()
            self.socks = []
            raise
        self._read(True)

    def _read(self, on: bool) -> None:
        if on != self._reading:
            for sock in self.socks:
                if on:
                    self.loop.add_reader(sock.fileno(), self._accept, sock)
                else:
                    self.loop.remove_reader(sock.fileno())
        self._reading = on

    def _accept(self, sock: socket.socket) -> None:
        while self.active < self.limit:
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in _SHORT_OF:
                    self._pause(e)
                    return
                continue  # that client's problem (ECONNABORTED...): the next one
            if self._paused is not None:
                if self.log is not None:
                    self.log.info("metrics_accept_resumed")
                self._paused = None
            self.active += 1
            task = self.loop.create_task(self._serve(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._read(False)  # full: the backlog holds the rest until a slot frees

    def _pause(self, e: OSError) -> None:
        if self._paused is None and self.log is not None:
            self.log.error("metrics_accept_paused", error=e.strerror, seconds=PAUSE_S)
        self._paused = e.strerror
        self._read(False)
        self._resume = self.loop.call_later(PAUSE_S, self._unpause)

    def _unpause(self) -> None:
        self._resume = None
        if self.socks and self.active < self.limit:
            self._read(True)

    async def _serve(self, conn: socket.socket) -> None:
        streams: list = []
        try:
            await asyncio.wait_for(self._session(conn, streams), self.deadline)
        except (asyncio.TimeoutError, OSError):
            if streams:
                streams[0].transport.abort()  # out of time: what is left is dropped
        finally:
            if not streams:
                conn.close()
            self.active -= 1
            if self.socks and self._resume is None:
                self._read(True)

    async def _session(self, conn: socket.socket, streams: list) -> None:
        conn.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=conn)
        streams.append(writer)
        await self.handler(reader, writer)
        writer.close()  # the answer is flushed first
        await writer.wait_closed()

    async def close(self) -> None:
        self._read(False)
        if self._resume is not None:
            self._resume.cancel()
        for sock in self.socks:
            sock.close()
        self.socks = []
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
