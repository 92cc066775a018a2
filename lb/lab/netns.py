"""Network-namespace plumbing for tests and the lab: a named namespace's links, bridges,
addresses, routes, neighbours, sysctls, offloads and XDP programs, and veth pairs between
namespaces. Links are driven over rtnetlink with pyroute2 (no `ip`), offloads with
pyroute2's ethtool. Creating, entering and running things inside namespaces is in
lb/lab/namespaces.py.

Every failure raises NetnsError (an OSError: .errno set) saying what failed.

    with Netns("lb-test") as a, Netns("lb-peer") as b:
        add_veth("a0", a, "b0", b)
        a.add_address("a0", "10.0.0.1/24")
        b.add_address("b0", "10.0.0.2/24")
        print(b.run(socket.gethostname))
"""

from __future__ import annotations

import contextlib
import errno as _errno
import ipaddress
import os
import socket
import subprocess
from typing import Any, Callable, Iterator, Optional, Sequence, Union

from pyroute2 import IPRoute
from pyroute2.ethtool import Ethtool
from pyroute2.ethtool.ioctl import EthtoolError, NoSuchDevice
from pyroute2.netlink.exceptions import NetlinkError

from .. import layout
from . import namespaces
from .namespaces import NetnsError, NsLike, ipr_in, nl_errors, ns_name, ns_path

_IFA_F_NODAD = 0x02
_TX_CSUM = "tx-checksumming"


def _index(ipr: IPRoute, ifname: str, name: Optional[str]) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise NetnsError(_errno.ENODEV, f"interface {ifname} not found in netns "
                         f"{name or 'current'}")
    return found[0]


def _sysctl_path(key: str) -> str:
    """"net.ipv4.ip_forward" or "net/ipv4/conf/eth0.5/rp_filter" (slashes when a part
    holds a dot)."""
    return "/proc/sys/" + (key.lstrip("/") if "/" in key else key.replace(".", "/"))


def _lladdr(mac: Union[bytes, str]) -> str:
    """A MAC as pyroute2 takes it (text), from bytes or text (checked either way)."""
    raw = layout.mac_bytes(mac) if isinstance(mac, str) else bytes(mac)
    if len(raw) != 6:
        raise ValueError(f"MAC of {len(raw)} bytes")
    return raw.hex(":")


class Netns:
    """A named network namespace, created (if missing) at construction unless
    create=False. As a context manager it is removed on exit unless owned=False."""

    def __init__(self, name: str, create: bool = True, owned: bool = True):
        self.name = name
        self.owned = owned
        if create:
            namespaces.create(name)

    def __repr__(self) -> str:
        return f"Netns({self.name!r})"

    @property
    def path(self) -> str:
        return ns_path(self.name)

    def remove(self) -> bool:
        return namespaces.remove(self.name)

    def __enter__(self) -> "Netns":
        return self

    def __exit__(self, *exc) -> None:
        if self.owned:
            self.remove()

    def entered(self) -> contextlib.AbstractContextManager:
        """`with ns.entered():` the calling thread works inside this namespace."""
        return namespaces.entered(self.name)

    def ipr(self) -> contextlib.AbstractContextManager:
        """`with ns.ipr() as ipr:` an rtnetlink socket (pyroute2 IPRoute) bound to this
        namespace."""
        return ipr_in(self.name)

    # --- links -----------------------------------------------------------------------
    def _index(self, ipr: IPRoute, ifname: str) -> int:
        return _index(ipr, ifname, self.name)

    def ifindex(self, ifname: str) -> int:
        with self.ipr() as ipr, nl_errors(f"looking up {ifname} in netns {self.name}"):
            return self._index(ipr, ifname)

    def mac(self, ifname: str) -> bytes:
        with self.ipr() as ipr, nl_errors(f"reading MAC of {ifname} in netns {self.name}"):
            link = ipr.get_links(self._index(ipr, ifname))[0]
            return layout.mac_bytes(link.get_attr("IFLA_ADDRESS"))

    def links(self) -> list[str]:
        with self.ipr() as ipr, nl_errors(f"listing links of netns {self.name}"):
            return [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]

    def set_link(self, ifname: str, *, mac: Union[bytes, str, None] = None,
                 mtu: Optional[int] = None, up: Optional[bool] = None,
                 master: Optional[str] = None) -> None:
        """Set MAC / MTU / bridge master, then bring the link up or down."""
        with self.ipr() as ipr, nl_errors(f"configuring {ifname} in netns {self.name}"):
            idx = self._index(ipr, ifname)
            attrs: dict[str, Any] = {}
            if mac is not None:
                attrs["address"] = _lladdr(mac)
            if mtu is not None:
                attrs["mtu"] = mtu
            if master is not None:
                attrs["master"] = self._index(ipr, master)
            if attrs:
                ipr.link("set", index=idx, **attrs)
            if up is not None:
                ipr.link("set", index=idx, state="up" if up else "down")

    def add_bridge(self, name: str, up: bool = True) -> int:
        """A bridge without STP (ports forward at once). Returns its ifindex."""
        with self.ipr() as ipr, nl_errors(f"creating bridge {name} in netns {self.name}"):
            if not ipr.link_lookup(ifname=name):
                ipr.link("add", ifname=name, kind="bridge", br_stp_state=0,
                         br_forward_delay=0)
            idx = self._index(ipr, name)
            if up:
                ipr.link("set", index=idx, state="up")
            return idx

    def delete_link(self, ifname: str) -> bool:
        with self.ipr() as ipr, nl_errors(f"deleting {ifname} in netns {self.name}"):
            found = ipr.link_lookup(ifname=ifname)
            if not found:
                return False
            ipr.link("del", index=found[0])
            return True

    # --- addresses, routes, neighbours ----------------------------------------------
    def add_address(self, ifname: str, address: str) -> None:
        """"10.0.0.1/24" or "fd00::1/64" (IPv6 without duplicate address detection, so
        it is usable at once). Adding an address already there is not an error."""
        iface = ipaddress.ip_interface(address)
        with self.ipr() as ipr, nl_errors(f"adding {address} to {ifname} in netns {self.name}"):
            idx = self._index(ipr, ifname)
            kw: dict[str, Any] = {}
            if iface.version == 6:
                kw["flags"] = _IFA_F_NODAD
            try:
                ipr.addr("add", index=idx, address=str(iface.ip),
                         prefixlen=iface.network.prefixlen, **kw)
            except NetlinkError as e:
                if e.code != _errno.EEXIST:
                    raise

    def add_route(self, dst: str, *, via: Optional[str] = None, dev: Optional[str] = None,
                  src: Optional[str] = None, onlink: bool = False,
                  family: Optional[int] = None) -> None:
        """dst is a prefix or "default" (family from `via`/`src`, or `family`, else v4).
        Replaces an existing route to the same prefix."""
        with self.ipr() as ipr, nl_errors(f"adding route {dst} in netns {self.name}"):
            fam = family
            for a in (via, src):
                if fam is None and a is not None:
                    fam = socket.AF_INET6 if ipaddress.ip_address(a).version == 6 \
                        else socket.AF_INET
            kw: dict[str, Any] = {}
            if dst == "default":
                fam = fam or socket.AF_INET
                kw["dst"] = "::/0" if fam == socket.AF_INET6 else "0.0.0.0/0"
            else:
                net = ipaddress.ip_network(dst, strict=False)
                fam = socket.AF_INET6 if net.version == 6 else socket.AF_INET
                kw["dst"] = str(net)
            kw["family"] = fam
            if via is not None:
                kw["gateway"] = via
            if dev is not None:
                kw["oif"] = self._index(ipr, dev)
            if src is not None:
                kw["prefsrc"] = src
            if onlink:
                kw["flags"] = 4  # RTNH_F_ONLINK
            ipr.route("replace", **kw)

    def add_neighbor(self, ifname: str, address: str, mac: Union[bytes, str]) -> None:
        """A permanent ARP / NDP entry."""
        with self.ipr() as ipr, nl_errors(f"adding neighbour {address} on {ifname} in netns "
                                    f"{self.name}"):
            fam = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 \
                else socket.AF_INET
            ipr.neigh("replace", ifindex=self._index(ipr, ifname), dst=address,
                      lladdr=_lladdr(mac), family=fam, state=0x80)  # NUD_PERMANENT

    # --- sysctls and offloads ---------------------------------------------------------
    def sysctl(self, key: str, value: Union[int, str]) -> None:
        """sysctl("net.ipv4.ip_forward", 1); dots or slashes; only net.* differs per
        namespace."""
        path = _sysctl_path(key)
        with self.entered():
            try:
                with open(path, "w") as f:
                    f.write(f"{value}\n")
            except OSError as e:
                raise NetnsError(e.errno, f"setting {key}={value} in netns {self.name}") \
                    from None

    def sysctl_get(self, key: str) -> str:
        path = _sysctl_path(key)
        with self.entered():
            try:
                with open(path) as f:
                    return f.read().strip()
            except OSError as e:
                raise NetnsError(e.errno, f"reading {key} in netns {self.name}") from None

    def router(self, forwarding: bool = True) -> None:
        """IPv4/IPv6 forwarding on, rp_filter off, accept_local on: a namespace that
        forwards packets whose sources it also owns (DSR labs) without dropping them."""
        v = 1 if forwarding else 0
        self.sysctl("net.ipv4.ip_forward", v)
        self.sysctl("net.ipv6.conf.all.forwarding", v)
        self.relaxed()

    def relaxed(self, ifnames: Sequence[str] = ()) -> None:
        """rp_filter 0 and accept_local 1 (all, default and the given interfaces)."""
        for dev in ("all", "default", *ifnames):
            self.sysctl(f"net/ipv4/conf/{dev}/rp_filter", 0)
            self.sysctl(f"net/ipv4/conf/{dev}/accept_local", 1)

    @contextlib.contextmanager
    def _ethtool(self, ifname: str, what: str) -> Iterator[Ethtool]:
        with self.entered():  # its sockets belong to the namespace they are made in
            with nl_errors(f"opening ethtool in netns {self.name}"):
                eth = Ethtool()
        try:
            yield eth
        except NoSuchDevice:
            raise NetnsError(_errno.ENODEV, f"{what} of {ifname} in netns {self.name}") \
                from None
        except EthtoolError:
            raise NetnsError(_errno.EOPNOTSUPP, f"{what} of {ifname} in netns "
                             f"{self.name}") from None
        except OSError as e:
            raise NetnsError(e.errno or _errno.EIO, f"{what} of {ifname} in netns "
                             f"{self.name}") from None
        finally:
            eth.close()

    def set_tx_checksum(self, ifname: str, on: bool) -> None:
        """`ethtool -K IF tx on|off`. Off makes the stack complete TCP/UDP checksums in
        software: needed on a veth whose frames are handled by XDP further on, since XDP
        frames carry no 'checksum still partial' mark and would leave with a bad one."""
        with self._ethtool(ifname, "setting tx checksum offload") as eth:
            eth.set_offload_flag(ifname, _TX_CSUM, 1 if on else 0)

    def tx_checksum(self, ifname: str) -> bool:
        with self._ethtool(ifname, "reading tx checksum offload") as eth:
            return eth.get_offload_flags(ifname)[_TX_CSUM]

    # --- XDP ------------------------------------------------------------------------
    def xdp_attach(self, ifname: str, prog_fd: int, mode: str = "native") -> int:
        """Attach an XDP program to an interface of this namespace; returns its ifindex.
        (bpf_xdp_attach resolves the ifindex in the caller's namespace.)"""
        from ..native import xdp_attach

        idx = self.ifindex(ifname)
        with self.entered():
            xdp_attach(idx, prog_fd, mode)
        return idx

    def xdp_detach(self, ifname: str, mode: str = "native") -> None:
        from ..native import xdp_detach

        idx = self.ifindex(ifname)
        with self.entered():
            xdp_detach(idx, mode)

    def xdp_query(self, ifname: str) -> dict:
        from ..native import xdp_query

        idx = self.ifindex(ifname)
        with self.entered():
            return xdp_query(idx)

    # --- code and commands inside ---------------------------------------------------
    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = 30.0,
            **kwargs: Any) -> Any:
        """fn(*args, **kwargs) in a forked child inside this namespace; returns its
        result (must pickle) or raises its exception (as NetnsError if it won't pickle)."""
        return namespaces.run_in(self.name, fn, *args, timeout=timeout, **kwargs)

    def spawn(self, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen:
        """Start argv inside this namespace (nsenter --net; /sys and bpffs stay)."""
        return namespaces.spawn_in(self.name, argv, **popen_kwargs)

    def check_output(self, argv: Sequence[str], timeout: float = 30.0) -> str:
        p = self.spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            raise NetnsError(_errno.ETIMEDOUT, f"{argv[0]} in netns {self.name}") from None
        if p.returncode != 0:
            raise NetnsError(_errno.EIO, f"{' '.join(argv)} in netns {self.name} exited "
                             f"{p.returncode}: {err.strip()[-300:]}")
        return out

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_DGRAM,
               proto: int = 0) -> socket.socket:
        """A socket living in this namespace, usable from any thread afterwards."""
        with self.entered():
            return socket.socket(family, type, proto)


def add_veth(name_a: str, ns_a: NsLike, name_b: str, ns_b: NsLike, *,
             mac_a: Union[bytes, str, None] = None, mac_b: Union[bytes, str, None] = None,
             mtu: Optional[int] = None, up: bool = True,
             queues: Optional[int] = None) -> tuple[int, int]:
    """A veth pair with end name_a in ns_a and name_b in ns_b (None: the caller's
    namespace), each end with `queues` TX and RX queues if given (one each by default;
    more let several CPUs send into it at once). Returns (ifindex_a, ifindex_b), each
    valid in its own namespace."""
    a, b = ns_name(ns_a), ns_name(ns_b)
    what = f"creating veth {name_a}@{a or 'current'} -- {name_b}@{b or 'current'}"
    peer: dict[str, Any] = {"ifname": name_b}
    kw: dict[str, Any] = {"ifname": name_a, "kind": "veth", "peer": peer}
    for end, mac in ((kw, mac_a), (peer, mac_b)):
        if mac is not None:
            end["address"] = _lladdr(mac)
        if mtu is not None:
            end["mtu"] = mtu
        if queues is not None:
            end["num_tx_queues"] = end["num_rx_queues"] = queues
    bfd = None
    if b != a:  # opened here, before entering a (None = the caller's namespace)
        try:
            bfd = os.open(ns_path(b) if b else "/proc/thread-self/ns/net", os.O_RDONLY)
        except OSError as e:
            raise NetnsError(e.errno, f"{what}: opening netns {b}") from None
        peer["net_ns_fd"] = bfd
    try:
        with ipr_in(a) as ipr, nl_errors(what):
            ipr.link("add", **kw)
    finally:
        if bfd is not None:
            os.close(bfd)
    idx = []
    for ns, ifname in ((a, name_a), (b, name_b)):
        with ipr_in(ns) as ipr, nl_errors(f"{what}: bringing {ifname} up"):
            i = _index(ipr, ifname, ns)
            if up:
                ipr.link("set", index=i, state="up")
            idx.append(i)
    return idx[0], idx[1]
