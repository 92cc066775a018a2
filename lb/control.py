"""The control socket: newline-delimited JSON requests and replies on a Unix socket
(mode 0600, root only). Requests: {"cmd": "stats"}, {"cmd": "backend", "action":
"drain|maint|activate", "vip": NAME_OR_ADDR, "backend": ADDR}, {"cmd": "explain", "proto",
"src", "sport", "dst", "dport"}, {"cmd": "announce", "action": "status|withdraw|restore"},
{"cmd": "ping"}. Replies: {"ok": true, "result": ...} or
{"ok": false, "error": "...", "code": N}."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from typing import Any, Optional

from .errors import XdplbError

ACTIONS = {"drain": "drain", "maint": "maint", "activate": "active"}


class NoInstance(Exception):
    pass


class ControlServer:
    """Serves `path`. Only a socket is ever removed there: a stale one at start, and at
    exit the very socket this instance bound (same device and inode); anything else at
    that path is refused, never deleted."""

    def __init__(self, daemon, path: str):
        self.d, self.path = daemon, path
        self.server = None
        self.bound: Optional[tuple[int, int]] = None  # (st_dev, st_ino) of our socket

    def claim(self) -> None:
        """Make sure the path is free for us, before the daemon touches anything:
        XdplbError for a live instance or for anything but a stale socket."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise XdplbError(f"control_socket {self.path} is {_kind(st.st_mode)}, not a "
                             f"socket: point control_socket at a free path (xdplb removes "
                             f"only sockets)")
        if _alive(self.path):
            raise XdplbError(f"another xdplb serves {self.path}: stop it first")
        os.unlink(self.path)

    async def start(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self.claim()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # created 0600: root only from the first moment
        try:
            sock.bind(self.path)  # never replaces anything that appeared meanwhile
            st = os.lstat(self.path)
            self.bound = (st.st_dev, st.st_ino)
            self.server = await asyncio.start_unix_server(self._client, sock=sock)
        except OSError as e:
            sock.close()
            raise XdplbError(f"cannot serve control_socket {self.path}: {e.strerror}") from None
        finally:
            os.umask(old)

    async def close(self) -> None:
        if self.server:
            self.server.close()
            await self.server.wait_closed()
        if self.bound is None:
            return
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == self.bound:
            os.unlink(self.path)
        self.bound = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    reply = {"ok": True, "result": self.handle(json.loads(line))}
                except KeyError as e:
                    reply = {"ok": False, "error": str(e).strip("'\""), "code": 1}
                except XdplbError as e:
                    reply = {"ok": False, "error": str(e), "code": e.exit_code}
                except Exception as e:  # a bad request must not stop the daemon
                    reply = {"ok": False, "error": f"{type(e).__name__}: {e}", "code": 2}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def handle(self, req: dict) -> Any:
        cmd = req.get("cmd")
        if cmd == "ping":
            return {"pid": os.getpid()}
        if cmd == "stats":
            return self.d.stats()
        if cmd == "backend":
            action = req.get("action")
            if action not in ACTIONS:
                raise KeyError(f"unknown action {action!r} (drain, maint, activate)")
            return {"state": self.d.set_admin(req["vip"], req["backend"], ACTIONS[action])}
        if cmd == "announce":
            action = req.get("action")
            if action not in ("status", "withdraw", "restore"):
                raise KeyError(f"unknown action {action!r} (status, withdraw, restore)")
            return self.d.set_announce(action)
        if cmd == "explain":
            from .explain import explain_running
            return explain_running(self.d, req["proto"], req["src"], int(req["sport"]),
                                   req["dst"], int(req["dport"]), req.get("quic_cid") or "")
        raise KeyError(f"unknown command {cmd!r}")


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISREG(mode):
        return "a regular file"
    return "a special file"


def _alive(path: str) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1)
            s.connect(path)
        return True
    except OSError:
        return False


def request(path: str, req: dict, timeout: float = 10.0) -> dict:
    """One request to a running instance; raises NoInstance when nothing answers."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(json.dumps(req).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                buf += chunk
    except (FileNotFoundError, ConnectionRefusedError) as e:
        raise NoInstance(f"no xdplb instance answers on {path}") from e
    return json.loads(buf)
