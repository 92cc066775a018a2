"""What a local user or a second instance can do to a running xdplb (lab xs-*): the
attacking steps run as `nobody`. A second instance on the same interface or pin path, a
pin directory made or swapped by nobody, a control_socket path that is not a socket,
idle connections to the metrics endpoint: the daemon refuses with one line (exit 2) or
shrugs, and never touches what is not its own."""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest

from lb.datapath import MAP_NAMES
from lb.lab import namespaces, netns, topology
from lb.lab.instance import Instance
from lb.native import BPF_MAP_TYPE_ARRAY, Map, create_map, obj_pin

import daemonctl

LAB = topology.Lab(prefix="xs-")
PIN = "/sys/fs/bpf/xdplb-sec"
SOCK = "/run/xdplb/sec.sock"
STATE = "/run/xdplb/sec-state.json"
METRICS = ("127.0.0.1", 19735)
# a directory anyone may add to, as bpffs mounted without mode=0700 is (1777)
STICKY = "/sys/fs/bpf/xdplb-sec-sticky"
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
HELD_CONNECTIONS = 1100  # past a 1024 descriptor limit


def config(tmp_path, name: str = "lb.toml", interface: str = "lb0", pin: str = PIN,
           sock: str = SOCK, metrics: bool = False) -> str:
    text = open("config/lab.toml").read()
    text = text.replace('interface = "lb0"', f'interface = "{interface}"')
    text = text.replace('bpf_pin_path = "/sys/fs/bpf/xdplb-lab"', f'bpf_pin_path = "{pin}"')
    text = text.replace('control_socket = "/run/xdplb/lab.sock"', f'control_socket = "{sock}"')
    text = text.replace('state_file = "/run/xdplb/lab-state.json"', f'state_file = "{STATE}"')
    extra = f'\nmetrics_listen = "{METRICS[0]}:{METRICS[1]}"' if metrics else ""
    text = text.replace('log_format = "console"', 'log_format = "json"' + extra)
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def run_xdplb(cfg: str, timeout: float = 15) -> tuple[int, str]:
    """Another xdplb in the lab's LB namespace: (exit code, stderr). One that keeps
    running is stopped after `timeout` (that is a failure of the test: -1)."""
    p = namespaces.spawn_in(LAB.lb, [sys.executable, "-m", "lb.cli", "--config", cfg],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, err = p.communicate(timeout=timeout)
        return p.returncode, err
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=15)
        return -1, err


def as_nobody(*argv: str) -> None:
    subprocess.run([*NOBODY, *argv], check=True, capture_output=True, timeout=30)


def remove_tree(path: str) -> None:
    """Remove what a test made on bpffs: pins, directories, symlinks (never followed)."""
    if os.path.islink(path):
        os.unlink(path)
    elif os.path.isdir(path):
        for name in os.listdir(path):
            p = os.path.join(path, name)
            (remove_tree if os.path.isdir(p) and not os.path.islink(p) else os.unlink)(p)
        os.rmdir(path)


def snapshot() -> dict:
    """What a second instance must not change: the attached program, the pinned maps'
    identities and their contents."""
    out = {"xdp": netns.Netns(LAB.lb, create=False, owned=False).xdp_query("lb0")}
    for name in ("vips", "vip_addrs", "config", "tx_port", "nexthops", "rings"):
        with Map.from_pin(f"{PIN}/{name}") as m:
            out[name] = (m.info()["id"], sorted(m.items()))
    with Map.from_pin(f"{PIN}/backends") as m:
        out["backends"] = [m.lookup(ctypes.c_uint32(i)) for i in range(1, 16)]
    for name in MAP_NAMES + ("prog",):
        out[f"{name}_ino"] = os.stat(f"{PIN}/{name}").st_ino
    return out


def forwarding() -> int:
    answers, failed = LAB.client_http(topology.VIP4, 20)
    return failed


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hardening")
    for p in (PIN, STICKY):
        remove_tree(p)
    if os.path.exists(STATE):
        os.unlink(STATE)
    LAB.up()
    cfg = config(tmp, metrics=True)
    # the daemon starts with the common soft limit of 1024 descriptors (a higher hard one)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
    try:
        d = Instance(LAB.lb, cfg, str(tmp / "daemon.log"))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        d.wait("datapath_attached")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                doc = daemonctl.stats(cfg)
                if all(b["state"] == "active" for v in doc["vips"] for b in v["backends"]):
                    break
            except (AssertionError, ValueError):
                pass
            time.sleep(0.1)
        os.makedirs(STICKY)
        os.chmod(STICKY, 0o1777)
        yield tmp, d
    finally:
        d.stop()
        LAB.down()
        for p in (PIN, STICKY):
            remove_tree(p)


def assert_refused(rc: int, err: str, *words: str) -> None:
    """Exit 2 with one line naming the cause: `xdplb: ...`, or with log_format = "json"
    (the lab's configs) one JSON start_failed event."""
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, (rc, err)
    text = (json.loads(lines[0])["error"] if lines[0].startswith("{") and
            json.loads(lines[0])["event"] == "start_failed" else
            lines[0] if lines[0].startswith("xdplb: ") else None)
    assert text is not None, lines[0]
    for w in words:
        assert w in text, text


# --- finding 3: a second instance ------------------------------------------------------------

@pytest.mark.parametrize("same", ["interface", "pin path"])
def test_second_instance_exits_before_touching_anything(env, same):
    """Same interface (other pin path and socket), or same pin path (other interface and
    socket): exit 2 naming the first one's pid; the first keeps its program, maps and
    traffic."""
    tmp, d = env
    before = snapshot()
    other = config(tmp, f"second-{same.replace(' ', '-')}.toml",
                   interface="lb0" if same == "interface" else "lo",
                   pin=PIN if same == "pin path" else "/sys/fs/bpf/xdplb-sec-second",
                   sock="/run/xdplb/sec-second.sock")
    rc, err = run_xdplb(other)
    remove_tree("/sys/fs/bpf/xdplb-sec-second")
    assert_refused(rc, err, f"pid {d.pid}", same)
    assert snapshot() == before
    assert d.proc.poll() is None and forwarding() == 0


# --- finding 1: the pin directory ------------------------------------------------------------

def test_pin_dir_made_by_nobody_is_refused(env):
    tmp, _ = env
    pins = f"{STICKY}/pins"
    as_nobody("mkdir", pins)
    try:
        rc, err = run_xdplb(config(tmp, "nobody-pins.toml", interface="lo", pin=pins,
                                   sock="/run/xdplb/sec-other.sock"))
        assert_refused(rc, err, pins, "uid 65534")
        assert os.listdir(pins) == []
    finally:
        remove_tree(pins)


def test_pin_dir_swapped_for_a_symlink_is_refused(env):
    """nobody points the pin path at a root-only directory holding pins named like ours:
    the daemon refuses; root's pins stay as they were."""
    tmp, _ = env
    victim, link = f"{STICKY}/victim", f"{STICKY}/pins"
    os.mkdir(victim, 0o700)
    ids = {}
    try:
        for name in ("config", "stats", "flows", "vips", "prog"):
            with create_map(BPF_MAP_TYPE_ARRAY, name, 4, 4, 1) as m:
                obj_pin(m.fd, f"{victim}/{name}")
                ids[name] = m.info()["id"]
        as_nobody("ln", "-s", victim, link)
        rc, err = run_xdplb(config(tmp, "symlink-pins.toml", interface="lo", pin=link,
                                   sock="/run/xdplb/sec-other.sock"))
        assert_refused(rc, err, link, "symlink")
        left = {}
        for name in sorted(os.listdir(victim)):
            with Map.from_pin(f"{victim}/{name}") as m:
                left[name] = m.info()["id"]
        assert left == ids
    finally:
        remove_tree(link)
        remove_tree(victim)


# --- finding 4: control_socket ---------------------------------------------------------------

@pytest.mark.parametrize("kind", ["file", "symlink", "directory"])
def test_control_socket_that_is_not_a_socket_is_refused(env, tmp_path, kind):
    target = tmp_path / "precious"
    target.write_text("keep me\n")
    path = tmp_path / "control.sock"
    if kind == "file":
        path.write_text("keep me too\n")
    elif kind == "symlink":
        path.symlink_to(target)
    else:
        path.mkdir()
    pins = "/sys/fs/bpf/xdplb-sec-other"
    rc, err = run_xdplb(config(tmp_path, interface="lo", pin=pins, sock=str(path)))
    try:
        assert_refused(rc, err, str(path), "not a socket")
        assert target.read_text() == "keep me\n"
        assert (path.read_text() == "keep me too\n" if kind == "file" else
                path.is_symlink() if kind == "symlink" else path.is_dir())
        assert not os.path.exists(pins)  # refused before anything was touched
    finally:
        remove_tree(pins)


# --- finding 2: the metrics endpoint ---------------------------------------------------------

# paced (50 connects per 50 ms), so that a server accepting everything gets them all
# without the listen backlog overflowing and SYNs waiting for retransmission
HOLD = """
import socket, sys, time
held = []
for i in range(int(sys.argv[1])):
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex(({host!r}, {port}))
    held.append(s)
    if i % 50 == 49:
        time.sleep(0.05)
time.sleep(float(sys.argv[2]))
"""


def test_idle_metrics_connections_do_not_starve_health_checks(env):
    """nobody opens 1,100 idle connections to metrics_listen and holds them 3 s (6 health
    checks): no backend changes state, no traceback, and the endpoint answers after."""
    _, d = env
    mark = d.mark()
    code = HOLD.format(host=METRICS[0], port=METRICS[1])
    p = namespaces.spawn_in(LAB.lb, [*NOBODY, sys.executable, "-c", code, str(HELD_CONNECTIONS),
                                "3"], stderr=subprocess.PIPE)
    assert p.wait(30) == 0, p.stderr.read()
    time.sleep(1)  # let what the flood caused reach the log
    assert d.events("backend_state_changed", mark) == []
    assert "Traceback" not in open(d.logpath).read()
    body = namespaces.run_in(LAB.lb, _scrape, timeout=30)
    assert "xdplb_packets_total" in body


def _scrape() -> str:
    import urllib.request
    with urllib.request.urlopen(f"http://{METRICS[0]}:{METRICS[1]}/metrics", timeout=10) as r:
        return r.read().decode()


# --- finding 4, at exit (last: it stops the daemon) ------------------------------------------

def test_control_socket_replaced_while_running_is_not_removed_at_exit(env):
    _, d = env
    moved = SOCK + ".moved"
    os.rename(SOCK, moved)
    try:
        with open(SOCK, "w") as f:
            f.write("not ours\n")
        assert d.stop() == 0
        assert open(SOCK).read() == "not ours\n"
        assert d.events("stopped")
    finally:
        for p in (SOCK, moved):
            if os.path.lexists(p):
                os.unlink(p)
