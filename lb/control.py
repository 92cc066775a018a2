"""The control socket: newline-delimited JSON requests and replies on a Unix socket
(mode 0600, root only). Requests: {"cmd": "stats"}, {"cmd": "backend", "action":
"drain|maint|activate", "vip": NAME_OR_ADDR, "backend": ADDR}, {"cmd": "explain", "proto",
"src", "sport", "dst", "dport"}, {"cmd": "ping"}. Replies: {"ok": true, "result": ...} or
{"ok": false, "error": "...", "code": N}."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from typing import Any

ACTIONS = {"drain": "drain", "maint": "maint", "activate": "active"}


class NoInstance(Exception):
    pass


class ControlServer:
    def __init__(self, daemon, path: str):
        self.d, self.path = daemon, path
        self.server = None

    async def start(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        if os.path.exists(self.path):
            if _alive(self.path):
                from .errors import XdplbError
                raise XdplbError(f"another xdplb serves {self.path}: stop it first")
            os.unlink(self.path)
        old = os.umask(0o077)
        try:
            self.server = await asyncio.start_unix_server(self._client, path=self.path)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self.server:
            self.server.close()
            await self.server.wait_closed()
        if os.path.exists(self.path):
            os.unlink(self.path)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    reply = {"ok": True, "result": self.handle(json.loads(line))}
                except KeyError as e:
                    reply = {"ok": False, "error": str(e).strip("'\""), "code": 1}
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
        if cmd == "explain":
            from .explain import explain_running
            return explain_running(self.d, req["proto"], req["src"], int(req["sport"]),
                                   req["dst"], int(req["dport"]))
        raise KeyError(f"unknown command {cmd!r}")


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
