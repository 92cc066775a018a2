"""BIRD 2 in the fleet lab: the router's config (made here) and each node's (the shipped
config/bird-node.conf with its define lines rewritten), each daemon run in the foreground
inside its namespace, with its config, control socket, pid file and log in a private
0700 directory of its own. Stopping it with SIGKILL is how a machine dies.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import stat
import subprocess
import time
from typing import Optional

from .namespaces import NetnsError, ns_path, spawn_in
from .topology import running

NODE_CONF = "config/bird-node.conf"
ROUTER_AS, NODE_AS = 65000, 65010
XDPLB_TABLE, XDPLB_PROTO = 200, 252
_FILES = ("bird.conf", "bird.ctl", "bird.pid", "bird.log")


def node_conf(node_id: str, router4: str, router6: str, log: str) -> str:
    """config/bird-node.conf for one node: its define lines set, its log in `log`."""
    with open(NODE_CONF) as f:
        text = f.read()
    values = {"NODE_ID": node_id, "NODE_AS": NODE_AS, "ROUTER_AS": ROUTER_AS,
              "ROUTER4": router4, "ROUTER6": router6, "XDPLB_TABLE": XDPLB_TABLE,
              "XDPLB_PROTO": XDPLB_PROTO}
    for name, value in values.items():
        text, n = re.subn(rf"^define {name} = [^;]*;", f"define {name} = {value};", text,
                          flags=re.M)
        if n != 1:
            raise ValueError(f"{NODE_CONF}: no single 'define {name} = ...;' line")
    text, n = re.subn(r"^log syslog all;", f'log "{log}" all;', text, flags=re.M)
    if n != 1:
        raise ValueError(f"{NODE_CONF}: no 'log syslog all;' line")
    return text


def router_conf(router_id: str, nodes: dict[str, tuple[str, str]], log: str) -> str:
    """The router: an eBGP session per node and family with BFD, and every learned VIP
    route written to the kernel with all its equal next hops (`merge paths`).
    nodes: session name -> (IPv4, IPv6 address of the node)."""
    out = [f'log "{log}" all;', f"router id {router_id};", "protocol device {}",
           'protocol bfd { interface "*" { min rx interval 50 ms; min tx interval 50 ms; '
           "multiplier 4; }; }"]
    for fam in ("ipv4", "ipv6"):
        out.append(f"protocol kernel {{ merge paths on; {fam} {{ import none; "
                   f"export all; }}; }}")
    out.append(f"template bgp node {{ local as {ROUTER_AS}; bfd on; graceful restart off; "
               "connect delay time 1; connect retry time 2; error wait time 1, 5; }")
    for name, (v4, v6) in nodes.items():
        for fam, addr in (("ipv4", v4), ("ipv6", v6)):
            out.append(f"protocol bgp {name}_{fam[-1]} from node {{ neighbor {addr} as "
                       f"{NODE_AS}; {fam} {{ import all; export none; }}; }}")
    return "\n".join(out) + "\n"


def _private_dir(path: str) -> None:
    """path as a directory only root can enter: made 0700, or an existing one checked
    (never a symlink, root's, no access for others)."""
    try:
        os.mkdir(path, 0o700)
        return
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o077:
        raise NetnsError(errno.EPERM, f"{path} is not a private directory of root's")


class Bird:
    """One BIRD daemon in namespace `ns`, its files in directory `home`."""

    def __init__(self, ns: str, home: str):
        self.ns, self.home = ns, home
        self.proc: Optional[subprocess.Popen] = None

    def path(self, name: str) -> str:
        return os.path.join(self.home, name)

    @property
    def log(self) -> str:
        return self.path("bird.log")

    def start(self, conf: str) -> None:
        _private_dir(self.home)
        self._remove_files()
        with open(self.path("bird.conf"), "w") as f:
            f.write(conf)
        self.proc = spawn_in(self.ns, ["bird", "-f", "-c", self.path("bird.conf"), "-s",
                                       self.path("bird.ctl"), "-P", self.path("bird.pid")],
                             stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"),
                             start_new_session=True)

    def pid(self) -> Optional[int]:
        """The running daemon's pid: ours, or the one its pid file names if that process
        is BIRD in our namespace (a lab brought up by another process)."""
        if self.proc is not None:
            return self.proc.pid if self.proc.poll() is None else None
        try:
            with open(self.path("bird.pid")) as f:
                pid = int(f.read())
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() != "bird":
                    return None
            if os.stat(f"/proc/{pid}/ns/net").st_ino != os.stat(ns_path(self.ns)).st_ino:
                return None
        except (OSError, ValueError):
            return None
        return pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 5.0) -> None:
        """Signal the daemon (SIGKILL: as its machine dies) and wait until it is gone."""
        pid = self.pid()
        if pid is None:
            return
        os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None:
                if self.proc.poll() is not None:
                    break
            elif not running(pid):
                break
            time.sleep(0.01)
        self.proc = None

    def show(self, what: str) -> str:
        """`birdc show WHAT` through this daemon's control socket."""
        return subprocess.run(["birdc", "-s", self.path("bird.ctl"), "show", *what.split()],
                              capture_output=True, text=True, timeout=10).stdout

    def _remove_files(self) -> None:
        for name in _FILES:
            path = self.path(name)
            if os.path.lexists(path) and not os.path.isdir(path):
                os.unlink(path)

    def remove(self) -> None:
        """Stop it and remove its directory (only the files it is known to hold)."""
        self.stop()
        if not os.path.isdir(self.home) or os.path.islink(self.home):
            return
        self._remove_files()
        try:
            os.rmdir(self.home)
        except OSError:
            pass
