"""The lab's "fleet" variant (`xdplb lab up --variant fleet`): three xdplb nodes behind a
router that spreads VIP traffic over them by ECMP on routes learned over BGP.

    xl-client -- c0 | rc0 [xl-rt] rt0 --+            router: BIRD, eBGP + BFD to each node,
    10.200.8.1        10.200.8.254      |              ECMP over their VIP routes (L4 hash)
                      10.200.0.1        +- br0 (xl-sw) 10.200.0.0/24, fd00:200::/64
    xl-n1..n3 eth0 10.200.0.2-4 --------+            nodes: xdplb (XDP_TX) + BIRD exporting
    xl-be1..3 eth0 10.200.0.11-13 ------+              kernel table 200
                                                     backends: decap XDP, VIPs on lo,
                                                       answer clients through the router

Each node runs xdplb with config/lab-fleet.toml (its pins, socket and state file renamed
per node) and BIRD with config/bird-node.conf. Killing a node as a machine dies takes its
link down and SIGKILLs its daemons; the router notices by BFD. The router hashes on
addresses, protocol and ports with a fixed seed, so a flow keeps its node while the set
of next hops stays the same.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import time
from typing import Optional

from pyroute2.netlink.exceptions import NetlinkError

from . import namespaces, netns
from .bird import XDPLB_PROTO, XDPLB_TABLE, Bird, node_conf, router_conf
from .decap import attach_decap, attach_pass
from .instance import Instance, RunFiles
from .topology import DEFAULT_PREFIX, GUE_PORT, VIP4, VIP6, Host, Lab, lab_netns, running

CONFIG = "config/lab-fleet.toml"
NET4, NET6 = "10.200.0", "fd00:200:"        # the segment of router, nodes and backends
CLIENT4, CLIENT6 = "10.200.8", "fd00:208:"  # the client's link to the router
# ECMP hash of the router: source and destination address, protocol, ports (policy 3,
# fields 0x37), with a fixed seed.
_HASH_FIELDS, _HASH_SEED = 0x37, 20260


class FleetLab(Lab):
    """Namespaces PREFIX + client, rt, sw, n1..n3, be1..be3."""

    def __init__(self, prefix: str = DEFAULT_PREFIX):
        super().__init__(prefix, variant="fleet")
        self.router = f"{prefix}rt"
        self.nodes = tuple(f"{prefix}n{i}" for i in (1, 2, 3))
        self.instances: dict[str, Instance] = {}
        self.birds: dict[str, Bird] = {}

    def hosts(self) -> dict[str, Host]:
        h = {"client": Host(self.client, f"{CLIENT4}.1", f"{CLIENT6}:1"),
             "router": Host(self.router, f"{NET4}.1", f"{NET6}:1")}
        for i, ns in enumerate(self.nodes, start=2):
            h[ns] = Host(ns, f"{NET4}.{i}", f"{NET6}:{i}")
        for i, ns in enumerate(self.backends, start=1):
            h[ns] = Host(ns, f"{NET4}.1{i}", f"{NET6}:1{i}")
        return h

    def namespaces(self) -> tuple[str, ...]:
        return (self.client, self.router, self.sw, *self.nodes, *self.backends)

    # --- building -----------------------------------------------------------------------
    def up(self) -> "FleetLab":
        self.down(quiet=True)
        os.makedirs(self.piddir, exist_ok=True)
        for node in self.nodes:  # events are read from the start of the log
            if os.path.isfile(self.node_log(node)):
                os.unlink(self.node_log(node))
        h = self.hosts()
        sw = lab_netns(self.sw)
        sw.add_bridge("br0")

        rt = lab_netns(self.router)
        rt.router()
        for fam in ("ipv4", "ipv6"):
            rt.sysctl(f"net.{fam}.fib_multipath_hash_policy", 3)
            rt.sysctl(f"net.{fam}.fib_multipath_hash_fields", _HASH_FIELDS)
        rt.sysctl("net.ipv4.fib_multipath_hash_seed", _HASH_SEED)  # IPv6 uses it too
        client = lab_netns(self.client)
        netns.add_veth("c0", client, "rc0", rt)
        client.add_address("c0", f"{h['client'].v4}/24")
        client.add_address("c0", f"{h['client'].v6}/64")
        client.set_tx_checksum("c0", False)
        client.add_route("default", via=f"{CLIENT4}.254")
        client.add_route("default", via=f"{CLIENT6}:254")
        rt.add_address("rc0", f"{CLIENT4}.254/24")
        rt.add_address("rc0", f"{CLIENT6}:254/64")
        netns.add_veth("rt0", rt, "sw-rt", sw)
        sw.set_link("sw-rt", master="br0", up=True)
        rt.add_address("rt0", f"{h['router'].v4}/24")
        rt.add_address("rt0", f"{h['router'].v6}/64")

        for i, name in enumerate(self.nodes, start=1):
            node = lab_netns(name)
            node.sysctl("net.ipv6.conf.all.keep_addr_on_down", 1)  # a link down keeps them
            netns.add_veth("eth0", node, f"sw-n{i}", sw)
            sw.set_link(f"sw-n{i}", master="br0", up=True)
            attach_pass(sw, f"sw-n{i}")  # receives the node's XDP_TX frames
            self._address_node(name)

        for i, name in enumerate(self.backends, start=1):
            be = lab_netns(name)
            netns.add_veth("eth0", be, f"sw-be{i}", sw)
            sw.set_link(f"sw-be{i}", master="br0", up=True)
            be.add_address("eth0", f"{h[name].v4}/24")
            be.add_address("eth0", f"{h[name].v6}/64")
            be.add_address("lo", f"{VIP4}/32")
            be.add_address("lo", f"{VIP6}/128")
            be.relaxed(["eth0"])
            be.add_route("default", via=h["router"].v4)
            be.add_route("default", via=h["router"].v6)
            attach_decap(be, "eth0", GUE_PORT)
            self.start_server(name)

        r = h["router"]
        self.bird(self.router).start(router_conf(
            r.v4, {n.removeprefix(self.prefix): (h[n].v4, h[n].v6) for n in self.nodes},
            self.bird(self.router).log))
        for name in self.nodes:
            self.start_bird(name)
        return self

    def _address_node(self, name: str) -> None:
        node, h = netns.Netns(name, create=False, owned=False), self.hosts()
        node.set_link("eth0", up=True)
        node.add_address("eth0", f"{h[name].v4}/24")
        node.add_address("eth0", f"{h[name].v6}/64")
        node.add_route("default", via=h["router"].v4)
        node.add_route("default", via=h["router"].v6)

    def bird(self, ns: str) -> Bird:
        """The BIRD of namespace `ns` (the router or a node): one object per daemon, so
        the process we started is the one we wait for."""
        if ns not in self.birds:
            self.birds[ns] = Bird(ns, os.path.join(self.piddir, f"bird-{ns}"))
        return self.birds[ns]

    def start_bird(self, node: str) -> None:
        h, bird = self.hosts(), self.bird(node)
        bird.start(node_conf(h[node].v4, h["router"].v4, h["router"].v6, bird.log))

    # --- the xdplb nodes ----------------------------------------------------------------
    def files(self, node: str) -> RunFiles:
        return RunFiles(f"fleet-{node.removeprefix(self.prefix)}")

    def node_config(self, node: str) -> str:
        """config/lab-fleet.toml with node n1's pins, socket and state file renamed for
        `node`, written next to the lab's logs."""
        with open(CONFIG) as f:
            text = f.read().replace("fleet-n1", self.files(node).tag)
        path = os.path.join(self.piddir, f"{node}.toml")
        with open(path, "w") as f:
            f.write(text)
        return path

    def start_node(self, node: str) -> Instance:
        """xdplb on `node` (a clean start: earlier pins and state removed)."""
        os.makedirs("/run/xdplb", exist_ok=True)
        self.files(node).clean()
        d = Instance(node, self.node_config(node), self.node_log(node))
        self.instances[node] = d
        with open(self._pidfile(node), "w") as f:
            f.write(str(d.pid))
        return d

    def node_log(self, node: str) -> str:
        return os.path.join(self.piddir, f"{node}.log")

    def _pidfile(self, node: str) -> str:
        return os.path.join(self.piddir, f"{node}-xdplb.pid")

    def stop_node(self, node: str) -> None:
        """SIGTERM to the node's xdplb (ours, or the one its pid file names), waited for."""
        d = self.instances.pop(node, None)
        if d is not None:
            d.stop()
        else:
            pid = _read_pid(self._pidfile(node))
            if pid is not None and _is_xdplb(pid):
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + 10
                while running(pid) and time.monotonic() < deadline:
                    time.sleep(0.02)
        if os.path.exists(self._pidfile(node)):
            os.unlink(self._pidfile(node))

    def kill_node(self, node: str) -> float:
        """The node dies as a machine does: its link goes down, its BIRD and xdplb are
        SIGKILLed. Returns the monotonic time the link went down."""
        t = time.monotonic()
        netns.Netns(node, create=False, owned=False).set_link("eth0", up=False)
        self.bird(node).stop(signal.SIGKILL)
        d = self.instances.pop(node, None)
        if d is not None:
            d.kill()
        return t

    def reboot_node(self, node: str) -> Instance:
        """A killed node comes back as a rebooted machine: no XDP program, no pins, an
        empty table 200; its link up, BIRD and xdplb started."""
        ns = netns.Netns(node, create=False, owned=False)
        ns.xdp_detach("eth0")
        self.flush_vip_routes(node)
        self._address_node(node)
        self.start_bird(node)
        return self.start_node(node)

    def flush_vip_routes(self, node: str) -> None:
        """Delete xdplb's routes (protocol 252) from the node's table 200, as a reboot
        does."""
        with namespaces.ipr_in(node) as ipr:
            for fam in (socket.AF_INET, socket.AF_INET6):
                for r in ipr.get_routes(family=fam, table=XDPLB_TABLE):
                    if r["proto"] == XDPLB_PROTO:
                        ipr.route("del", family=fam, table=XDPLB_TABLE, proto=XDPLB_PROTO,
                                  type=r["type"], dst=r.get_attr("RTA_DST"),
                                  dst_len=r["dst_len"])

    # --- the router's view --------------------------------------------------------------
    def next_hops(self, vip: str) -> set[str]:
        """The router's next hops for the VIP route (empty: none)."""
        with namespaces.ipr_in(self.router) as ipr:
            return _next_hops(ipr, vip)

    def wait_next_hops(self, vip: str, want: set[str], timeout: float = 20.0,
                       since: Optional[float] = None) -> float:
        """Poll the router (every 5 ms) until the VIP's next hops are `want`; the seconds
        from `since` (default: now) until they were."""
        t0 = time.monotonic() if since is None else since
        deadline = time.monotonic() + timeout
        with namespaces.ipr_in(self.router) as ipr:
            while True:
                got = _next_hops(ipr, vip)
                if got == want:
                    return time.monotonic() - t0
                if time.monotonic() > deadline:
                    raise TimeoutError(f"router: next hops of {vip} are {sorted(got)}, "
                                       f"not {sorted(want)}")
                time.sleep(0.005)

    def node_addresses(self, nodes=None, family: int = 4) -> set[str]:
        h = self.hosts()
        return {h[n].v6 if family == 6 else h[n].v4 for n in (nodes or self.nodes)}

    def node_of(self, flows: list[tuple[str, str, int, str, int]]) -> list[Optional[str]]:
        """The node the router sends each flow (protocol, src, sport, dst, dport) to,
        asked of its kernel (`ip route get ... iif rc0 ipproto sport dport`)."""
        lines = [f"route get {dst} from {src} iif rc0 ipproto {proto} sport {sport} "
                 f"dport {dport}" for proto, src, sport, dst, dport in flows]
        p = namespaces.spawn_in(self.router, ["ip", "-j", "-batch", "-"], stdin=-1, stdout=-1,
                           stderr=-1, text=True)
        out, err = p.communicate("\n".join(lines) + "\n", timeout=30)
        by_addr = {a: n for n in self.nodes for a in (self.hosts()[n].v4, self.hosts()[n].v6)}
        answers = [json.loads(line) for line in out.splitlines() if line.strip()]
        if len(answers) != len(flows):
            raise RuntimeError(f"ip route get: {len(answers)} answers to {len(flows)}: {err}")
        return [by_addr.get(a[0].get("gateway", "")) if a else None for a in answers]

    # --- cutting a node off its backends ------------------------------------------------
    def cut_backends(self, node: str, cut: bool = True) -> None:
        """Drop (or stop dropping) every frame from `node` to the backends in the switch,
        health checks and forwarded traffic alike."""
        port = f"sw-{node.removeprefix(self.prefix)}"
        table = f"cut_{port.replace('-', '_')}"
        bes = ", ".join(f'"sw-{b.removeprefix(self.prefix)}"' for b in self.backends)
        script = (f"table bridge {table} {{ chain cut {{ type filter hook forward priority 0;"
                  f' iifname "{port}" oifname {{ {bes} }} drop; }}; }}\n' if cut else
                  f"delete table bridge {table}\n")
        p = namespaces.spawn_in(self.sw, ["nft", "-f", "-"], stdin=-1, stderr=-1, text=True)
        _, err = p.communicate(script, timeout=10)
        if p.returncode != 0:
            raise RuntimeError(f"nft in {self.sw}: {err.strip()}")

    # --- tearing down -------------------------------------------------------------------
    def down(self, quiet: bool = True) -> None:
        for name in self.nodes:
            self.stop_node(name)
            self.files(name).clean()
        for name in (self.router, *self.nodes):
            self.bird(name).remove()
        for name in self.backends:
            self.stop_server(name)
        for name in namespaces.list_namespaces():
            if name in self.namespaces():
                namespaces.remove(name)
        if not quiet:
            print("fleet lab down")


def _next_hops(ipr, vip: str) -> set[str]:
    ip = ipaddress.ip_address(vip)
    fam = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    out: set[str] = set()
    for r in ipr.get_routes(family=fam, table=254):
        if r.get_attr("RTA_DST") != str(ip) or r["dst_len"] != ip.max_prefixlen:
            continue
        if r.get_attr("RTA_GATEWAY"):
            out.add(r.get_attr("RTA_GATEWAY"))
        for nh in r.get_attr("RTA_MULTIPATH") or ():
            if nh.get_attr("RTA_GATEWAY"):
                out.add(nh.get_attr("RTA_GATEWAY"))
    return out


def _read_pid(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def _is_xdplb(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"lb.cli" in f.read()
    except OSError:
        return False
