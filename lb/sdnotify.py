"""systemd's notify protocol, spoken over `$NOTIFY_SOCKET` (an AF_UNIX datagram socket;
a leading `@` names an abstract one): READY=1 once the daemon serves, RELOADING=1 and
READY=1 around a reload, STATUS= a one-line summary, WATCHDOG=1 at half `WATCHDOG_USEC`
from the asyncio loop (a stuck loop stops the pings and systemd restarts the service),
STOPPING=1 on the way out. Without `$NOTIFY_SOCKET` every call is a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from typing import Callable, Iterator, Mapping, Optional

STATUS_S = 1.0    # how often the STATUS line is recomputed (sent only when it changes)
READY_POLL_S = 0.05


def status_line(vips: int, states: Mapping, announced: Optional[int] = None) -> str:
    """'3 VIPs, 5/6 backends active[, 2 announced]'. states: (vip, backend) -> the
    effective state the maps hold."""
    active = sum(1 for s in states.values() if s == "active")
    line = f"{vips} VIP{'s' if vips != 1 else ''}, {active}/{len(states)} backends active"
    return line if announced is None else f"{line}, {announced} announced"


class Notifier:
    def __init__(self, log, status: Callable[[], str],
                 env: Mapping[str, str] = os.environ):
        """status(): the current STATUS line."""
        self.log, self.status_of = log, status
        addr = env.get("NOTIFY_SOCKET", "")
        self.address: Optional[str] = ("\0" + addr[1:] if addr.startswith("@") else
                                       addr if addr.startswith("/") else None)
        self.watchdog_s: Optional[float] = None
        usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_s = int(usec) / 2e6  # sd_watchdog_enabled(3): ping at half
        self._sock: Optional[socket.socket] = None
        self._failed = False
        self._status: Optional[str] = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """One datagram of KEY=VALUE lines; False (logged once) if systemd cannot hear."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                # non-blocking: a systemd that stopped reading must not stall the loop
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM
                                           | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
            self._sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as e:
            if not self._failed:
                self._failed = True
                self.log.warning("sd_notify_failed", socket=self.address.replace("\0", "@"),
                                 error=e.strerror or str(e))
            return False
        if self._failed:
            self._failed = False
            self.log.info("sd_notify_recovered")
        return True

    def status(self, line: str, *extra: str) -> None:
        """Send STATUS= (with extra fields) when it changed or extra fields ride along."""
        if line != self._status or extra:
            if self.send(*extra, f"STATUS={line}"):
                self._status = line

    @contextlib.contextmanager
    def reloading(self) -> Iterator[None]:
        """RELOADING=1 (with the CLOCK_MONOTONIC time systemd's notify-reload asks for)
        before the block, READY=1 after it, whether the new config was taken or not."""
        now_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={now_us}")
        try:
            yield
        finally:
            self.status(self.status_of(), "READY=1")

    async def serve(self, ready: Callable[[], bool]) -> None:
        """Run in the daemon's loop until cancelled: watchdog pings from now on, READY=1
        (with STATUS=) once ready() is true (the daemon: attached, maps filled, first
        health round done), then STATUS= on changes; STOPPING=1 when
        cancelled."""
        if not self.enabled:
            return
        pinger = (asyncio.get_running_loop().create_task(self._watchdog())
                  if self.watchdog_s else None)
        try:
            while not ready():
                await asyncio.sleep(READY_POLL_S)
            self.status(self.status_of(), "READY=1")
            while True:
                await asyncio.sleep(STATUS_S)
                self.status(self.status_of())
        finally:
            if pinger is not None:
                pinger.cancel()
            self.send("STOPPING=1")
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    async def _watchdog(self) -> None:
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_s)
