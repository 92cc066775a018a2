"""Driving a real xdplb daemon from outside: start `python -m lb.cli --config CONFIG` in a
namespace, read its JSON log as events, wait for it, talk to its control socket, stop it,
and remove what it pinned. Used by `make demo`, the tests and bench/health; the daemon
never imports it.

    files = RunFiles("e2e-tx")           # pins, control socket, state file of one instance
    files.clean()
    d = Instance(lab.lb, "lb.toml", "daemon.log")
    d.wait("datapath_attached")
    ...
    d.stop()
    files.clean()
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

from ..config import load_config
from ..control import NoInstance, request
from .namespaces import NsLike, spawn_in


class InstanceError(RuntimeError):
    """The daemon exited, or what was awaited did not happen in time."""


def remove_pins(pin_dir: str) -> None:
    """Remove an instance's pin directory: the maps and program it pinned, then the
    directory (a daemon killed with SIGKILL, or one that kept its data path, leaves
    them). Entries that are not pins (symlinks, directories) are left alone."""
    if os.path.islink(pin_dir) or not os.path.isdir(pin_dir):
        return
    for name in os.listdir(pin_dir):
        path = os.path.join(pin_dir, name)
        if stat.S_ISREG(os.lstat(path).st_mode):
            os.unlink(path)
    os.rmdir(pin_dir)


def toml_value(value: Union[str, int, float, bool]) -> str:
    """A plain value as TOML (strings are written as they are, unescaped)."""
    if isinstance(value, str):
        return f'"{value}"'
    return str(value).lower() if isinstance(value, bool) else str(value)


@dataclass(frozen=True)
class RunFiles:
    """Where one instance keeps its pinned maps, control socket and state file, named by
    a tag so that instances side by side (tests, bench, the demo) never share them."""

    tag: str

    @property
    def pin(self) -> str:
        return f"/sys/fs/bpf/xdplb-{self.tag}"

    @property
    def sock(self) -> str:
        return f"/run/xdplb/{self.tag}.sock"

    @property
    def state(self) -> str:
        return f"/run/xdplb/{self.tag}-state.json"

    def lb_table(self, interface: str, **settings: Union[str, int, float, bool]) -> str:
        """The config's [lb] table for these files with a JSON log, plus `settings`."""
        lines = ["[lb]", f'interface = "{interface}"']
        lines += [f"{key} = {toml_value(value)}" for key, value in settings.items()]
        lines += [f'bpf_pin_path = "{self.pin}"', f'control_socket = "{self.sock}"',
                  f'state_file = "{self.state}"', 'log_format = "json"']
        return "\n".join(lines) + "\n"

    def clean(self) -> None:
        """Remove the pins and the state file an earlier run left."""
        remove_pins(self.pin)
        for path in (self.state, self.sock):
            if os.path.exists(path) and not os.path.islink(path):
                os.unlink(path)


class Instance:
    """One daemon process in namespace `ns`, its output appended to `log`. Events are
    the log's lines in order (JSON objects; any other line counts as {"event":
    "non-json"}), so an index into them ("after") stays valid across instances that
    share a log."""

    def __init__(self, ns: NsLike, config: str, log: str, env: Optional[dict] = None,
                 wrapper: Sequence[str] = ()):
        """env: the daemon's environment (default: ours); wrapper: a command prefix
        (e.g. setpriv ... --) the daemon runs under."""
        self.config, self.logpath = config, log
        with open(log, "a") as out:
            self.proc = spawn_in(ns, [*wrapper, sys.executable, "-m", "lb.cli",
                                      "--config", config],
                                 stdout=out, stderr=subprocess.STDOUT, env=env)
        self._events: list[dict] = []
        self._partial = b""
        self._read = 0  # bytes of the log parsed so far
        self._sock: Optional[str] = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    # --- the log --------------------------------------------------------------------
    def _all_events(self) -> list[dict]:
        try:
            with open(self.logpath, "rb") as f:
                f.seek(self._read)
                data = f.read()
        except FileNotFoundError:
            return self._events
        self._read += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            try:
                ev = json.loads(line)
            except ValueError:
                ev = None
            self._events.append(ev if isinstance(ev, dict) else
                                {"event": "non-json", "line": line.decode(errors="replace")})
        return self._events

    def events(self, name: Union[str, tuple, None] = None, after: int = 0,
               **match: Any) -> list[dict]:
        """Events from index `after` on named `name` (or one of a tuple of names) whose
        fields equal `match`."""
        names = (name,) if isinstance(name, str) else name
        return [e for e in self._all_events()[after:]
                if (names is None or e.get("event") in names)
                and all(e.get(k) == v for k, v in match.items())]

    def mark(self) -> int:
        """The index the next event will have."""
        return len(self._all_events())

    def tail(self) -> str:
        with open(self.logpath, errors="replace") as f:
            return f.read()[-3000:]

    # --- waiting --------------------------------------------------------------------
    def wait_until(self, pred: Callable[[], Any], what: str, timeout: float = 20.0,
                   ignore: tuple = (), poll: float = 0.02) -> Any:
        """pred()'s first true value, polled while the daemon runs; exceptions in
        `ignore` count as false. InstanceError if the daemon exits or time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = pred()
                if value:
                    return value
            except ignore:
                pass
            if self.proc.poll() is not None:
                raise InstanceError(f"xdplb exited ({self.proc.returncode}) before "
                                    f"{what}: {self.tail()}")
            if time.monotonic() > deadline:
                raise InstanceError(f"timed out waiting for {what}; log: {self.tail()}")
            time.sleep(poll)

    def wait(self, name: Union[str, tuple], after: int = 0, timeout: float = 20.0,
             **match: Any) -> dict:
        """The first event from `after` on that events(name, **match) finds."""
        return self.wait_until(lambda: next(iter(self.events(name, after, **match)), None),
                               f"a {name} event {match or ''}", timeout)

    # --- the control socket ---------------------------------------------------------
    @property
    def sock(self) -> str:
        if self._sock is None:
            self._sock = load_config(self.config).lb.control_socket
        return self._sock

    def request(self, req: dict) -> dict:
        return request(self.sock, req)

    def stats(self) -> dict:
        return self.request({"cmd": "stats"})["result"]

    def wait_control(self, timeout: float = 20.0) -> None:
        """Until this process (not an older instance) answers on the control socket."""
        self.wait_until(lambda: self.request({"cmd": "ping"})["result"]["pid"] == self.pid,
                        "its control socket", timeout, ignore=(NoInstance,))

    # --- stopping -------------------------------------------------------------------
    def stop(self, timeout: float = 10.0) -> Optional[int]:
        """SIGTERM, then SIGKILL if it has not exited within `timeout` s; its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: the attached program and the pins stay, as after a crash."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
