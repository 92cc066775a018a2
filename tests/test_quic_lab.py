"""Real QUIC through a real xdplb in the lab (aioquic on both ends, lb/lab/quic.py): the
backends issue connection IDs carrying their server IDs, and clients that move to a new
local port mid-connection keep talking to the backend they started on: 30 of 30 with
`quic = true`; with `quic = false` the moved connections are hashed anew and most land
on a backend that does not know them (so this test can fail). A ring change by SIGHUP
keeps established QUIC connections on their backends."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from lb.lab import namespaces, topology
from lb.lab.instance import Instance, RunFiles
from lb.lab.quic import CID_LEN, SID_LEN, QuicClient

import daemonctl

QPORT = 4433
N = 30
WAIT = 20.0


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = topology.Lab(prefix="xq-").up()
    tmp = tmp_path_factory.mktemp("quic-lab")
    procs = []
    try:
        for i, name in enumerate(lab.backends, start=1):
            ready = tmp / f"{name}.ready"
            with open(tmp / f"{name}.log", "ab") as log:
                procs.append(namespaces.spawn_in(name, [
                    sys.executable, "-m", "lb.lab.quic", name, "--server-id", str(i),
                    "--port", str(QPORT), "--vip", topology.VIP4, "--vip", topology.VIP6,
                    "--ready", str(ready)], stdout=log, stderr=log, start_new_session=True))
            deadline = time.monotonic() + WAIT
            while not ready.exists():
                assert procs[-1].poll() is None, (tmp / f"{name}.log").read_text()
                assert time.monotonic() < deadline, f"QUIC server of {name} not ready"
                time.sleep(0.05)
        yield lab, tmp
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(10)
        lab.down()


def config(files, quic: bool, weights=(1, 1, 1)) -> str:
    text = daemonctl.lab_config(files, encap="ipip", ring_size=65537)
    for name, vip, fam in (("h3", topology.VIP4, "v4"), ("h3v6", topology.VIP6, "v6")):
        text += (f'\n[[vip]]\nname = "{name}"\naddress = "{vip}"\nport = {QPORT}\n'
                 f'protocol = "udp"\nquic = {str(quic).lower()}\n'
                 f"quic_server_id_len = {SID_LEN}\nquic_cid_len = {CID_LEN}\n"
                 f"[vip.health]\nport = {topology.HTTP_PORT}\n")
        for i, (w, be) in enumerate(zip(weights, ("11", "12", "13")), start=1):
            addr = f"10.200.0.{be}" if fam == "v4" else f"fd00:200::{be}"
            text += f'[[vip.backend]]\naddress = "{addr}"\nweight = {w}\nserver_id = {i}\n'
    return text


@pytest.fixture(scope="module")
def daemon(lab, tmp_path_factory):
    lab_, tmp = lab
    files = RunFiles("quic-lab")
    files.clean()
    cfg = str(tmp / "lb.toml")
    with open(cfg, "w") as f:
        f.write(config(files, quic=True))
    d = Instance(lab_.lb, cfg, str(tmp / "daemon.log"))
    try:
        d.wait("datapath_attached", timeout=WAIT)
        d.wait_control(WAIT)
        d.wait_until(lambda: all(b["state"] == "active" for v in d.stats()["vips"]
                                 for b in v["backends"]), "every backend active", WAIT)
        yield d, files, cfg
    finally:
        d.stop()
        files.clean()


def reload(d, cfg: str, text: str) -> None:
    with open(cfg + ".new", "w") as f:
        f.write(text)
    os.replace(cfg + ".new", cfg)
    n = d.mark()
    d.proc.send_signal(signal.SIGHUP)
    ev = d.wait(("config_reloaded", "config_rejected"), after=n, timeout=WAIT)
    assert ev["event"] == "config_reloaded", ev
    d.wait_until(lambda: all(b["state"] == "active" for v in d.stats()["vips"]
                             for b in v["backends"]), "every backend active", WAIT)


def sockets(lab, fams) -> list[socket.socket]:
    """One UDP socket of the client per connection, each on a new local port."""
    with namespaces.entered(lab.client):
        return [socket.socket(socket.AF_INET6 if f == 6 else socket.AF_INET,
                              socket.SOCK_DGRAM) for f in fams]


def each(fn, items) -> list:
    with ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(fn, items))


def connect(lab, fams) -> tuple[list[QuicClient], list]:
    """Clients that completed a handshake and one request: (clients, backend each)."""
    vip = {4: topology.VIP4, 6: topology.VIP6}
    clients = [QuicClient(s, (vip[f], QPORT)) for s, f in zip(sockets(lab, fams), fams)]

    def start(c: QuicClient):
        return c.ask() if c.handshake() else None
    first = each(start, clients)
    assert None not in first, f"handshakes/requests failed: {first}"
    return clients, first


def migrate_all(lab, clients, fams) -> list:
    """Each client moves to a new local port (and a new connection ID) and asks again."""
    for c, s in zip(clients, sockets(lab, fams)):
        c.migrate(s)
    return each(lambda c: c.ask(), clients)


def counters(d) -> dict:
    return d.stats()["global"]


FAMS = [4] * 20 + [6] * 10


def test_migrating_connections_stay_on_their_backend(lab, daemon):
    lab_, _ = lab
    d, files, cfg = daemon
    before = counters(d)
    clients, first = connect(lab_, FAMS)
    try:
        assert set(first) <= set(lab_.backends) and len(set(first)) > 1, first
        after = migrate_all(lab_, clients, FAMS)
        assert after == first, f"{sum(a != b for a, b in zip(after, first))} of {N} moved"
        # and again, after a ring change by SIGHUP (weights): still their backends
        ring = daemonctl.pinned_ring(files.pin, topology.VIP4, QPORT, socket.IPPROTO_UDP)
        reload(d, cfg, config(files, quic=True, weights=(5, 1, 2)))
        assert daemonctl.pinned_ring(files.pin, topology.VIP4, QPORT,
                                     socket.IPPROTO_UDP) != ring
        assert each(lambda c: c.ask(), clients) == first
        assert migrate_all(lab_, clients, FAMS) == first
        now = counters(d)
        assert now["quic_routed_by_cid"] - before["quic_routed_by_cid"] >= 3 * N
        # the running instance explains a connection ID as the data path routes it
        c, name = clients[0], first[0]
        host = lab_.hosts()[name]
        r = daemonctl.cli("explain", "--config", cfg, "udp", "10.200.0.1", "1",
                          topology.VIP4, str(QPORT), "--quic-cid", c.dcid.hex())
        assert r.returncode == 0 and f"backend {host.v4} (QUIC connection ID" in r.stdout, \
            r.stdout + r.stderr
    finally:
        for c in clients:
            c.close()
        reload(d, cfg, config(files, quic=True))


def test_without_quic_routing_migrations_land_elsewhere(lab, daemon):
    """The same clients with quic = false: a moved connection is a new UDP flow, hashed
    onto the ring; on another backend it is unknown and gets no answer."""
    lab_, _ = lab
    d, files, cfg = daemon
    reload(d, cfg, config(files, quic=False))
    clients, first = connect(lab_, FAMS)
    try:
        after = migrate_all(lab_, clients, FAMS)
        lost = sum(a is None for a in after)
        assert lost > 0 and all(a in (None, b) for a, b in zip(after, first)), (first, after)
    finally:
        for c in clients:
            c.close()
        reload(d, cfg, config(files, quic=True))
