"""Running xdplb as a service: the systemd unit passes `systemd-analyze verify`, and the
daemon works with exactly the capabilities the unit grants (uid 0 kept, every other
capability gone from its bounding set) and fails in one line, exit 2, with one fewer."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys

import pytest

from lb import preflight
from lb.errors import XdplbError
from lb.lab import topology
from lb.lab.instance import Instance, RunFiles

import daemonctl

UNIT = "config/xdplb.service"
INSTALLED_BIN = "/opt/xdplb/bin/xdplb"
LAB = topology.Lab(prefix="xc-")
FILES = RunFiles("caps")


def _unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(UNIT)
    return unit


def _verify(tmp_path, text: str) -> subprocess.CompletedProcess:
    """systemd-analyze verify on the unit text, with the installed binary's path pointed
    at this checkout's (verify insists that ExecStart= exists)."""
    here = shutil.which("xdplb", path=os.path.dirname(sys.executable))
    assert here, "xdplb is not installed in this venv"
    path = tmp_path / "xdplb.service"
    path.write_text(text.replace(INSTALLED_BIN, here))
    return subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                          text=True, timeout=60)


def test_unit_verifies(tmp_path):
    text = open(UNIT).read()
    r = _verify(tmp_path, text)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    # what the checks above catch: a bad value is a warning, a unit that cannot start
    # an error
    r = _verify(tmp_path, text.replace("Type=notify", "Type=notifyy"))
    assert "notifyy" in r.stderr
    r = _verify(tmp_path, re.sub(r"^ExecStart=.*\n", "", text, flags=re.M))
    assert r.returncode != 0


def test_unit_settings():
    svc = _unit()["Service"]
    assert svc["Type"] in ("notify", "notify-reload")
    assert svc["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert svc["Restart"] == "on-failure" and int(svc["WatchdogSec"]) > 0
    assert svc["NoNewPrivileges"] == "yes" and svc["ProtectSystem"] == "strict"
    assert (svc["StateDirectory"], svc["RuntimeDirectory"]) == ("xdplb", "xdplb")
    assert "/sys/fs/bpf" in svc["ReadWritePaths"].split()
    # the unit grants what preflight requires, no more
    for key in ("CapabilityBoundingSet", "AmbientCapabilities"):
        assert sorted(svc[key].split()) == sorted(preflight.REQUIRED_CAPS), key


def test_architecture_without_ordered_loads_is_refused():
    """The seqlock reads in the data path are right only with x86-64 load ordering."""
    preflight.check_architecture("x86_64")
    preflight.check_architecture()  # this host
    with pytest.raises(XdplbError, match="x86-64 memory ordering and this host is aarch64"):
        preflight.check_architecture("aarch64")


def test_missing_caps():
    bits = {name: 1 << bit for name, bit in preflight.REQUIRED_CAPS.items()}
    everything = sum(bits.values())
    assert preflight.missing_caps(everything) == []
    assert preflight.missing_caps(everything & ~bits["CAP_PERFMON"]) == ["CAP_PERFMON"]
    assert preflight.missing_caps(bits["CAP_NET_ADMIN"] | 1 << preflight.CAP_SYS_ADMIN) == []
    assert preflight.missing_caps(0) == list(preflight.REQUIRED_CAPS)


# --- the daemon with exactly those capabilities --------------------------------------------
def setpriv(caps) -> list[str]:
    """uid 0 with only `caps`: for root, execve grants the bounding set, so that set is
    all it gets (inheritable and ambient carry them across a further exec)."""
    names = "".join(f",+{c[4:].lower()}" for c in caps)
    return ["setpriv", f"--inh-caps=-all{names}", f"--ambient-caps=-all{names}",
            f"--bounding-set=-all{names}", "--"]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("caps")
    FILES.clean()
    LAB.up()
    cfg = tmp / "lb.toml"
    cfg.write_text(daemonctl.lab_config(FILES, backends=("10.200.0.11", "10.200.0.12")))
    try:
        yield tmp, str(cfg)
    finally:
        LAB.down()
        FILES.clean()


def test_runs_with_exactly_the_required_caps(lab):
    tmp, cfg = lab
    d = Instance(LAB.lb, cfg, str(tmp / "exact.log"), wrapper=setpriv(preflight.REQUIRED_CAPS))
    try:
        d.wait("datapath_attached")
        status = open(f"/proc/{d.pid}/status").read()
        eff = int(re.search(r"CapEff:\s*(\w+)", status).group(1), 16)
        assert eff == sum(1 << bit for bit in preflight.REQUIRED_CAPS.values())
        d.wait_until(lambda: all(b["state"] == "active"
                                 for b in d.stats()["vips"][0]["backends"]), "backends up")
        got, failed = LAB.client_http(topology.VIP4, 20)
        assert failed == 0 and sum(got.values()) == 20 and len(got) == 2
        assert d.stop() == 0
        assert d.events("stopped")
    finally:
        d.stop()


@pytest.mark.parametrize("dropped", sorted(preflight.REQUIRED_CAPS))
def test_one_fewer_cap_fails_in_one_line(lab, dropped):
    tmp, cfg = lab
    caps = [c for c in preflight.REQUIRED_CAPS if c != dropped]
    log = tmp / f"no-{dropped}.log"
    d = Instance(LAB.lb, cfg, str(log), wrapper=setpriv(caps))
    try:
        assert d.proc.wait(30) == 2
    finally:
        d.stop()
    out = log.read_text().strip().splitlines()
    assert len(out) == 1 and dropped in out[0] and "Traceback" not in out[0], out
    assert not os.path.exists(FILES.pin)


LOAD_AND_ATTACH = """
import socket, sys
from lb.attach import attach
from lb.datapath import Datapath, Limits
from lb.errors import XdplbError
class Quiet:
    def __getattr__(self, level):
        return lambda *a, **kw: None
try:
    dp = Datapath(Limits(max_vips=16, max_backends=64, flow_table_size=1024), pin_dir=sys.argv[1])
    try:
        attach(socket.if_nametoindex("lb0"), "lb0", dp.prog_fd, "native", Quiet())
    finally:
        dp.unpin_all()
        dp.close()
except XdplbError as e:
    print(str(e).splitlines()[0])
    sys.exit(2)
"""


@pytest.mark.parametrize("dropped", [None, *sorted(preflight.REQUIRED_CAPS)])
def test_kernel_needs_each_cap(lab, dropped):
    """Past preflight: the kernel itself refuses to load or attach with one fewer."""
    caps = [c for c in preflight.REQUIRED_CAPS if c != dropped]
    r = subprocess.run(["nsenter", f"--net=/run/netns/{LAB.lb}", "--", *setpriv(caps),
                        sys.executable, "-c", LOAD_AND_ATTACH, FILES.pin],
                       capture_output=True, text=True, timeout=60)
    try:
        assert r.returncode == (0 if dropped is None else 2), r.stdout + r.stderr
        assert "Traceback" not in r.stderr
    finally:
        subprocess.run(["nsenter", f"--net=/run/netns/{LAB.lb}", "--", "ip", "link", "set",
                        "lb0", "xdp", "off"], check=True)
        FILES.clean()
