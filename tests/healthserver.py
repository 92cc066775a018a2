"""A controllable health endpoint for the health-check tests: a TCP listener in a
namespace, served by a thread of the test process, answering each accepted connection
as a script or mode says and counting them."""

from __future__ import annotations

import select
import socket
import threading
import time

from lb.lab import namespaces


def read_request(conn: socket.socket) -> bytes:
    """An HTTP request's head (up to the blank line, or what came before the peer closed)."""
    conn.settimeout(2)
    req = b""
    while b"\r\n\r\n" not in req:
        chunk = conn.recv(4096)
        if not chunk:
            break
        req += chunk
    return req


class HealthServer:
    """A TCP listener in namespace `ns` on (addr, port), served by a thread of this process.
    Each accepted connection takes the next entry of `script`, else `mode`:
      an int (HTTP status), "hang" (accept, never answer), "close" (read the request,
      close without answering),
      "garbage" (16 KiB without a newline), "redirect" (301 to another path).
    "refuse" closes the listener (the kernel answers SYNs with RST).
    accepted counts connections in accept order; decisions are taken under one lock with
    the counting, so a test knows exactly which check got which answer."""

    def __init__(self, ns: str, addr: str, port: int, mode="ok"):
        self.ns, self.addr, self.port = ns, addr, port
        self.lock = threading.Lock()
        self.mode, self.script = 200, []
        self.accepted = 0
        self.given: list = []        # what each accepted connection got
        self.requests: list[bytes] = []
        self.hung: list[socket.socket] = []
        self.sock = None
        self.stop_flag = False
        self.set_mode(mode)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _listen(self) -> None:
        fam = socket.AF_INET6 if ":" in self.addr else socket.AF_INET
        with namespaces.entered(self.ns):
            s = socket.socket(fam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.addr, self.port))
        s.listen(64)
        s.setblocking(False)
        self.sock = s

    def set_mode(self, mode, script=()) -> int:
        """Switch; returns how many connections were accepted before the switch."""
        mode = 200 if mode == "ok" else mode
        with self.lock:
            if mode == "refuse":
                if self.sock is not None:
                    self.sock.close()
                    self.sock = None
            elif self.sock is None:
                self._listen()
            self.mode, self.script = mode, list(script)
            return self.accepted

    def count(self) -> int:
        with self.lock:
            return self.accepted

    def _run(self) -> None:
        while not self.stop_flag:
            s = self.sock
            if s is None:
                time.sleep(0.01)
                continue
            try:
                ready, _, _ = select.select([s], [], [], 0.05)
            except (OSError, ValueError):
                continue
            if not ready:
                continue
            with self.lock:
                if self.sock is not s:
                    continue
                try:
                    conn, _ = s.accept()
                except OSError:
                    continue
                what = self.script.pop(0) if self.script else self.mode
                self.accepted += 1
                self.given.append(what)
            try:
                self._serve(conn, what)
            except OSError:
                conn.close()

    def _serve(self, conn: socket.socket, what) -> None:
        if what == "hang":
            self.hung.append(conn)
            return
        conn.setblocking(True)
        self.requests.append(read_request(conn))
        if what == "close":
            pass
        elif what == "garbage":
            conn.sendall(b"x" * 16384)
        elif what == "redirect":
            conn.sendall(b"HTTP/1.1 301 Moved\r\nLocation: /elsewhere\r\n"
                         b"Content-Length: 0\r\nConnection: close\r\n\r\n")
        else:
            conn.sendall(f"HTTP/1.1 {what} X\r\nContent-Length: 0\r\nConnection: close"
                         f"\r\n\r\n".encode())
        conn.close()

    def close(self) -> None:
        self.stop_flag = True
        self.thread.join(2)
        with self.lock:
            if self.sock is not None:
                self.sock.close()
                self.sock = None
        for c in self.hung:
            c.close()
