"""The harness of tests/test_e2e.py: its labs (the lab's "tx" and "redirect" variants,
with client source ports handed out by the test), the config each daemon runs (the lab
config's interfaces, everything else from a dict the tests edit), and Setup: one daemon
(variant x encap), its events, control socket, rings and their predictions.
"""

from __future__ import annotations

import copy
import ipaddress
import os
import signal
import socket
import threading
import time
from typing import Callable, Optional

from lb import maglev
from lb.config import load_config
from lb.control import NoInstance, request
from lb.flowhash import flow_hash
from lb.lab import namespaces, netns, topology
from lb.lab.instance import Instance, RunFiles
from lb.specs import backend_key

import configtext
import daemonctl
from traffic import DYN_LO, KINDS, PORT_HI, VIP4, VIP6, WAIT

PREFIXES = {"tx": "xe-", "redirect": "xr-"}
SETUPS = [("tx", "ipip"), ("tx", "gue"), ("redirect", "ipip"), ("redirect", "gue")]
RING = 65537
INTERVAL, TIMEOUT, RISE, FALL = 0.25, 0.2, 2, 3
EPHEMERAL = "61000 65535"               # the client's own ephemeral range, apart from ours

# name: (family, port, protocol, weights of be1..be3). Unequal weights on three VIPs.
BASE_VIPS = {
    "web": (4, topology.HTTP_PORT, "tcp", (1, 2, 3)),
    "web6": (6, topology.HTTP_PORT, "tcp", (3, 1, 2)),
    "echo": (4, topology.UDP_PORT, "udp", (1, 1, 1)),
    "echo6": (6, topology.UDP_PORT, "udp", (1, 2, 1)),
    "long": (4, topology.ECHO_PORT, "tcp", (1, 1, 1)),
    "long6": (6, topology.ECHO_PORT, "tcp", (1, 1, 1)),
}


class E2ELab(topology.Lab):
    """A lab plus the bookkeeping of this file: source ports handed out, in namespaces."""

    def __init__(self, variant: str):
        super().__init__(prefix=PREFIXES[variant], variant=variant)
        self._ports: dict = {}
        self._lock = threading.Lock()

    def up(self) -> "E2ELab":
        super().up()
        netns.Netns(self.client, create=False, owned=False).sysctl(
            "net.ipv4.ip_local_port_range", EPHEMERAL)
        return self

    def port(self, key) -> int:
        with self._lock:
            p = self._ports.get(key, DYN_LO)
            assert p <= PORT_HI, f"lab {self.prefix}: out of client source ports for {key}"
            self._ports[key] = p + 1
            return p

    def sock(self, family: int, kind: int) -> socket.socket:
        with namespaces.entered(self.client):
            return socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET, kind)

    def src(self, family: int) -> str:
        h = self.hosts()["client"]
        return h.v6 if family == 6 else h.v4

    def addr(self, i: int, family: int) -> str:
        h = self.hosts()[self.backends[i - 1]]
        return h.v6 if family == 6 else h.v4


# --- config ------------------------------------------------------------------------------

def base_conf(encap: str) -> dict:
    return {"encap": encap, "interval": INTERVAL, "extra": "",
            "vips": {name: {"family": f, "port": port, "protocol": proto,
                            "backends": {i + 1: [w, "active"] for i, w in enumerate(ws)}}
                     for name, (f, port, proto, ws) in BASE_VIPS.items()}}


def render(setup: "Setup", conf: dict) -> str:
    """The lab config's interfaces, this file's everything else."""
    lab = setup.lab
    lb = load_config(topology.CONFIGS[lab.variant]).lb
    egress = {"egress_interface": lb.egress_interface} if lb.egress_interface else {}
    text = setup.files.lb_table(lb.interface, **egress, encap=conf["encap"],
                                gue_port=topology.GUE_PORT, ring_size=RING,
                                flow_table_size=65536)
    text += configtext.section("health", type="http", path="/healthz",
                               interval=conf["interval"], timeout=TIMEOUT, rise=RISE, fall=FALL)
    for name, v in conf["vips"].items():
        backends = [configtext.backend(str(lab.addr(i, v["family"])), weight=w, state=state)
                    for i, (w, state) in sorted(v["backends"].items())]
        text += configtext.vip(name, VIP6 if v["family"] == 6 else VIP4, v["port"], backends,
                               protocol=v["protocol"],
                               health=({"port": topology.HTTP_PORT}
                                       if v["port"] != topology.HTTP_PORT else None))
    return text + conf["extra"]


# --- the daemon --------------------------------------------------------------------------

class Setup:
    """One daemon (variant x encap) and the config it runs."""

    def __init__(self, lab: E2ELab, encap: str, tmp):
        self.lab, self.encap = lab, encap
        self.id = f"{lab.variant}-{encap}"
        self.files = RunFiles(f"e2e-{self.id}")
        self.cfgpath = str(tmp / f"{self.id}.toml")
        self.logpath = str(tmp / f"{self.id}.log")
        self.conf = base_conf(encap)
        self.daemons: list[Instance] = []  # every one started, the current one last

    @property
    def proc(self):
        return self.daemons[-1].proc if self.daemons else None

    # process
    def _clean(self) -> None:
        try:  # a daemon of an earlier, interrupted run of this file still serving
            pid = request(self.files.sock, {"cmd": "ping"}, timeout=2)["result"]["pid"]
            os.kill(pid, signal.SIGKILL)
        except (NoInstance, OSError, ValueError, KeyError):
            pass
        self.files.clean()

    def start(self, fresh: bool = True) -> dict:
        if fresh:
            self._clean()
            self.write(self.conf)
        n = self.mark()
        d = Instance(self.lab.lb, self.cfgpath, self.logpath)
        self.daemons.append(d)
        ev = d.wait("datapath_attached", after=n, timeout=WAIT)
        d.wait_control(WAIT)  # the control socket comes up right after
        return ev

    def stop(self) -> None:
        for d in self.daemons:
            d.stop()
        self._clean()

    # log events (log_format json: one object per line)
    def read_events(self) -> list[dict]:
        return self.daemons[-1].events() if self.daemons else []

    def mark(self) -> int:
        """The index the next event will have (see Instance.mark)."""
        return self.daemons[-1].mark() if self.daemons else 0

    def wait_event(self, name, after: int, timeout: float = WAIT) -> dict:
        return self.daemons[-1].wait(name, after, timeout)

    def tail(self) -> str:
        return self.daemons[-1].tail()

    # config and control
    def write(self, conf: dict) -> None:
        tmp = self.cfgpath + ".new"
        with open(tmp, "w") as f:
            f.write(render(self, conf))
        os.replace(tmp, self.cfgpath)

    def hup(self, conf: Optional[dict] = None, broken: bool = False) -> dict:
        """Write conf (or a broken variant of the current one), SIGHUP, wait for the
        verdict; returns the config_reloaded / config_rejected event."""
        if broken:
            with open(self.cfgpath, "a") as f:
                f.write('\n[[vip]]\nname = 1\n')
        else:
            self.write(conf)
        n = self.mark()
        self.proc.send_signal(signal.SIGHUP)
        ev = self.wait_event(("config_reloaded", "config_rejected"), after=n)
        if broken:
            assert ev["event"] == "config_rejected", ev
            self.write(self.conf)  # the file goes back to what runs
        else:
            assert ev["event"] == "config_reloaded", (ev, self.tail())
            self.conf = copy.deepcopy(conf)
        return ev

    def control(self, req: dict) -> dict:
        r = request(self.files.sock, req)
        assert r["ok"], r
        return r["result"]

    def stats(self) -> dict:
        return self.control({"cmd": "stats"})

    def states(self) -> dict[tuple[str, str], str]:
        return {(v["name"], b["address"]): b["state"] for v in self.stats()["vips"]
                for b in v["backends"]}

    def wait_states(self, want: Callable[[dict], bool], what: str,
                    timeout: float = WAIT) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            st = self.states()
            if want(st):
                return st
            assert self.proc.poll() is None, f"daemon exited: {self.tail()}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {st}"
            time.sleep(0.02)

    def wait_all_active(self) -> None:
        """Every backend of the current config active in the stats, and the maps saying
        so too: every VIP's installed ring is the one its active backends make."""
        self.wait_states(lambda st: all(s == "active" for s in st.values()),
                         "every backend active")
        want = {v: self.expected_ring(v) for v in BASE_VIPS}
        deadline = time.monotonic() + WAIT
        while (got := {v: self.ring(v) for v in BASE_VIPS}) != want:
            assert self.proc.poll() is None, f"daemon exited: {self.tail()}"
            assert time.monotonic() < deadline, \
                f"rings never matched the config: {[v for v in want if want[v] != got[v]]}"
            time.sleep(0.02)

    def expected_ring(self, vip: str) -> list[str]:
        """The ring of a VIP when its backends are up (drained ones out), by the
        reference Maglev, as backend namespace names."""
        v = self.conf["vips"][vip]
        members = sorted(((ipaddress.ip_address(self.lab.addr(i, v["family"])), w, i)
                          for i, (w, st) in v["backends"].items() if st == "active" and w),
                         key=lambda m: backend_key(m[0]))
        ids = maglev.build([maglev.Slotholder(backend_key(a), w) for a, w, _ in members],
                           RING, [i for _, _, i in members])
        return [self.lab.backends[i - 1] for i in ids]

    def set_admin(self, action: str, backend: int, vips=tuple(BASE_VIPS)) -> None:
        for name in vips:
            fam = self.conf["vips"][name]["family"]
            self.control({"cmd": "backend", "action": action, "vip": name,
                          "backend": self.lab.addr(backend, fam)})

    def baseline(self) -> None:
        """Back to the start: daemon running, every server up, base config, all active."""
        if self.proc is None or self.proc.poll() is not None:
            self.start(fresh=False)
        for i, name in enumerate(self.lab.backends, start=1):
            if not os.path.exists(os.path.join(self.lab.piddir, f"{name}.pid")):
                self.lab.start_server(name)
        base = base_conf(self.encap)
        if self.conf != base:
            self.hup(base)
        for (vip, addr), s in self.states().items():
            if s in ("drain", "maint"):
                self.control({"cmd": "backend", "action": "activate", "vip": vip,
                              "backend": addr})
        self.wait_all_active()

    # the data path's choice, read from the pinned maps
    def ring(self, vip: str) -> list[str]:
        """The installed ring of a VIP, as backend namespace names per slot."""
        v = self.conf["vips"][vip]
        addr = str(VIP6 if v["family"] == 6 else VIP4)
        proto = socket.IPPROTO_TCP if v["protocol"] == "tcp" else socket.IPPROTO_UDP
        for _ in range(10):  # a swap between the lookups frees the ring we found
            addrs = daemonctl.pinned_ring(self.files.pin, addr, v["port"], proto)
            if addrs:
                break
        assert len(addrs) == RING, f"the ring of {vip} is gone"
        names = self.lab.name_of()
        return [names.get(a, f"#{a}") for a in addrs]

    def predict(self, ring: list[str], kind: str, sport: int) -> str:
        vip = self.conf["vips"][KINDS.get(kind, kind)]
        fam = vip["family"]
        proto = socket.IPPROTO_TCP if vip["protocol"] == "tcp" else socket.IPPROTO_UDP
        h = flow_hash(proto, ipaddress.ip_address(self.lab.src(fam)), sport,
                      ipaddress.ip_address(VIP6 if fam == 6 else VIP4), vip["port"])
        return ring[h % len(ring)]
