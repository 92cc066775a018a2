"""Admin states set at run time (`xdplb backend drain|maint|activate`), persisted to
`state_file` with an atomic write, so they survive SIGHUP and restarts. A runtime state
overrides the config's `state` for that VIP/backend, `activate` included (an operator's
last word wins over the file), until the next runtime command for that pair."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional

STATES = ("active", "drain", "maint")


class AdminStates:
    def __init__(self, path: str):
        self.path = Path(path)
        self._states: dict[tuple[str, str], str] = {}
        self.load()

    def load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            raise ValueError(f"state_file {self.path} is unreadable ({e}); fix or remove it") from e
        for item in data.get("backends", []):
            if item.get("state") in STATES:
                self._states[(item["vip"], item["backend"])] = item["state"]

    def get(self, vip: str, backend: str) -> str | None:
        return self._states.get((vip, backend))

    def set(self, vip: str, backend: str, state: str) -> None:
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}")
        self._states[(vip, backend)] = state
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        items = [{"vip": v, "backend": b, "state": s}
                 for (v, b), s in sorted(self._states.items())]
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".state.")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"backends": items}, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def admin_lookup(states: Optional[AdminStates], cfg) -> Callable[[str, str], str]:
    """admin_of(vip, backend) for cfg (a Config): the runtime state, else the config's
    `state`, else active."""
    configured = {(v.name, str(b.address)): b.state for v in cfg.vips for b in v.backends}

    def admin_of(vip: str, backend: str) -> str:
        runtime = states.get(vip, backend) if states is not None else None
        return runtime or configured.get((vip, backend), "active")
    return admin_of
