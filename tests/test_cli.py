"""The command line's contract for errors a user can cause: one line naming the cause and
the fix, no traceback, and the spec's exit codes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from configtext import MINIMAL  # one VIP, one backend


def config_text(iface: str, tmp) -> str:
    """MINIMAL on `iface`, with pins, control socket and state file of this test's own."""
    return MINIMAL.replace('interface = "eth0"\n', f'''interface = "{iface}"
bpf_pin_path = "/sys/fs/bpf/xdplb-clitest"
control_socket = "/run/xdplb/clitest.sock"
state_file = "{tmp}/state.json"
''', 1)


def run(*args: str, prefix: tuple = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "lb.cli", *args],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def cfg(tmp_path):
    def make(iface: str = "eth9") -> str:
        p = tmp_path / "lb.toml"
        p.write_text(config_text(iface, tmp_path))
        return str(p)
    return make


def one_line(r: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_missing_interface_is_an_environment_error(cfg):
    r = run("--config", cfg("eth9"))
    assert r.returncode == 2
    assert one_line(r).startswith("xdplb: interface eth9 not found (ip link shows: ")
    assert not os.path.exists("/sys/fs/bpf/xdplb-clitest"), "a failed start left a pin dir"


def test_bad_config_exits_1_naming_the_key(cfg, tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text(open(cfg()).read().replace('port = 80', 'port = 70000'))
    r = run("--config", str(p))
    assert r.returncode == 1 and "port" in one_line(r) and "70000" in r.stderr
    r = run("check", "--config", str(p))
    assert r.returncode == 1 and "70000" in r.stdout
    r = run("check", "--config", cfg())
    assert r.returncode == 0 and r.stdout.strip() == "ok: 1 vips, 1 backends"
    r = run("check", "--config", str(tmp_path / "nope.toml"))
    assert r.returncode == 1 and r.stdout.count("nope.toml") == 1


def test_no_instance_exits_3(cfg):
    for args in (("stats", "--json"), ("backend", "drain", "web", "10.1.0.11"),
                 ("announce", "status"), ("announce", "withdraw")):
        r = run(*args, "--config", cfg())
        assert r.returncode == 3
        assert "no xdplb instance answers on /run/xdplb/clitest.sock" in one_line(r)


def test_explain_without_instance(cfg):
    r = run("explain", "--config", cfg(), "tcp", "198.51.100.7", "40000", "192.0.2.10", "80")
    assert r.returncode == 0 and "backend 10.1.0.11" in r.stdout and "note:" in r.stdout
    r = run("explain", "--config", cfg(), "udp", "198.51.100.7", "1", "192.0.2.10", "80")
    assert r.returncode == 1 and one_line(r) == "xdplb: 192.0.2.10:80/udp is not a VIP"


def test_pin_path_off_bpffs(cfg, tmp_path):
    p = tmp_path / "pin.toml"
    p.write_text(open(cfg("lo")).read().replace("/sys/fs/bpf/xdplb-clitest",
                                                str(tmp_path / "pins")))
    r = run("--config", str(p))
    assert r.returncode == 2 and "not on a bpf filesystem" in one_line(r)


@pytest.mark.skipif(not shutil.which("setpriv"), reason="needs setpriv")
def test_not_root():
    d = tempfile.mkdtemp(prefix="xdplb-cli-")  # pytest's tmp dirs are root-only
    try:
        os.chmod(d, 0o755)
        p = os.path.join(d, "lb.toml")
        with open(p, "w") as f:
            f.write(config_text("lo", d))
        os.chmod(p, 0o644)
        nobody = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                  "--inh-caps=-all", "--bounding-set=-all")
        probe = subprocess.run([*nobody, sys.executable, "-c", "import lb.cli"],
                               capture_output=True, cwd=os.getcwd())
        if probe.returncode != 0:
            pytest.skip("this checkout is not readable by an unprivileged user")
        r = run("--config", p, prefix=nobody)
        assert r.returncode == 2, r.stderr
        assert "must run as root" in one_line(r)
    finally:
        shutil.rmtree(d)
