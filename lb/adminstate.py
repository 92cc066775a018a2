"""Admin states set at run time (`xdplb backend drain|maint|activate`), persisted to
`state_file` with an atomic write, so they survive SIGHUP and restarts. A runtime state
overrides the config's `state` for that VIP/backend, `activate` included (an operator's
last word wins over the file), until the next runtime command for that pair.

The node-level withdrawal of the VIP announcements (`xdplb announce withdraw|restore`)
is kept in the same file ("announce_withdrawn": true).

A change is all-or-nothing: the file is written (temp file + rename) before memory
changes, so a failed write changes nothing. A state file that cannot be read or has the
wrong shape stops the start (ConfigError naming the file): starting without it would
put drained or maintained backends back into service."""

from __future__ import annotations

import ipaddress
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Callable, Optional

from .errors import ConfigError, XdplbError

STATES = ("active", "drain", "maint")
MAX_BYTES = 64 << 20


class AdminStates:
    def __init__(self, path: str):
        self.path = Path(path)
        self._states: dict[tuple[str, str], str] = {}
        self._withdrawn = False
        self.load()

    def load(self) -> None:
        try:
            text = self._read().decode("utf-8")
        except FileNotFoundError:
            self._states, self._withdrawn = {}, False
            return
        except (OSError, UnicodeDecodeError) as e:
            raise self._corrupt(getattr(e, "strerror", None) or str(e)) from None
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise self._corrupt(f"not JSON: {e}") from None
        self._states = self._parse(data)
        withdrawn = data.get("announce_withdrawn", False)
        if not isinstance(withdrawn, bool):
            raise self._corrupt('"announce_withdrawn" must be true or false')
        self._withdrawn = withdrawn

    def _read(self) -> bytes:
        # non-blocking open: a FIFO in its place must not hang the start
        fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(0, "not a regular file")
            data = f.read(MAX_BYTES + 1)
        if len(data) > MAX_BYTES:
            raise OSError(0, f"larger than {MAX_BYTES >> 20} MiB")
        return data

    def _parse(self, data) -> dict[tuple[str, str], str]:
        items = data.get("backends", []) if isinstance(data, dict) else None
        if not isinstance(items, list):
            raise self._corrupt('expected {"backends": [...]}')
        states = {}
        for item in items:
            if not (isinstance(item, dict) and
                    all(isinstance(item.get(k), str) for k in ("vip", "backend", "state"))):
                raise self._corrupt('each backend must be {"vip": ..., "backend": ..., '
                                    '"state": ...} with strings')
            if item["state"] in STATES:
                states[(item["vip"], item["backend"])] = item["state"]
        return states

    def _corrupt(self, why: str) -> ConfigError:
        from .textsafe import escape
        return ConfigError(f"state_file {escape(str(self.path))} is unusable ({escape(why)}): "
                           f"fix it, or move it aside to start without runtime admin states")

    def get(self, vip: str, backend: str) -> str | None:
        return self._states.get((vip, backend))

    def set(self, vip: str, backend: str, state: str) -> None:
        """Persist, then remember; XdplbError (nothing changed) when the file cannot be
        written."""
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}")
        states = {**self._states, (vip, backend): state}
        self._save(states, self._withdrawn)
        self._states = states

    @property
    def announce_withdrawn(self) -> bool:
        """The node's announcements withdrawn by `xdplb announce withdraw`."""
        return self._withdrawn

    def set_announce_withdrawn(self, withdrawn: bool) -> None:
        """Persist, then remember (as `set`)."""
        self._save(self._states, withdrawn)
        self._withdrawn = withdrawn

    def _save(self, states: dict[tuple[str, str], str], withdrawn: bool) -> None:
        items = [{"vip": v, "backend": b, "state": s} for (v, b), s in sorted(states.items())]
        doc: dict = {"backends": items}
        if withdrawn:
            doc["announce_withdrawn"] = True
        tmp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".state.")
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            tmp = None
        except OSError as e:
            raise XdplbError(f"cannot write state_file {self.path}: "
                             f"{e.strerror or e}; nothing changed (fix the path or its "
                             f"directory)") from None
        finally:
            if tmp is not None and os.path.lexists(tmp):
                os.unlink(tmp)


def admin_lookup(states: Optional[AdminStates], cfg) -> Callable[[str, str], str]:
    """admin_of(vip, backend) for cfg (a Config): the runtime state, else the config's
    `state`, else active."""
    configured = {(v.name, str(b.address)): b.state for v in cfg.vips for b in v.backends}

    def admin_of(vip: str, backend: str) -> str:
        runtime = states.get(vip, backend) if states is not None else None
        return runtime or configured.get((vip, backend), "active")
    return admin_of


def find_pair(cfg, vip: str, backend: str) -> tuple[str, str]:
    """(VIP name, backend address) of cfg (a Config) that `xdplb backend` names: the VIP
    by name or address, the backend by address in any spelling; KeyError (exit 1) saying
    which one is unknown."""
    v = next((v for v in cfg.vips if v.name == vip or str(v.address) == vip), None)
    if v is None:
        raise KeyError(f"unknown VIP {vip!r}")
    try:
        addr = str(ipaddress.ip_address(backend))
    except ValueError:
        raise KeyError(f"backend {backend!r} is not an IP address") from None
    if not any(str(b.address) == addr for b in v.backends):
        raise KeyError(f"VIP {v.name} has no backend {addr}")
    return v.name, addr
