"""`xdplb explain --quic-cid HEX` without a running instance (the running one is asked in
tests/test_quic_lab.py): the backend a short header's connection ID names on a QUIC VIP,
or why it is balanced as UDP instead."""

from __future__ import annotations

import pytest

import configtext
from test_cli import config_text, one_line, run

QUIC_VIP = configtext.vip(
    "h3", "192.0.2.20", 443,
    [configtext.backend("10.1.0.21", server_id=258), configtext.backend("10.1.0.22", server_id=7),
     configtext.backend("10.1.0.23", server_id=9, state="maint")],
    protocol="udp", quic=True, quic_server_id_len=2, quic_cid_len=8)
FLOW = ("udp", "198.51.100.7", "40000", "192.0.2.20", "443")


@pytest.fixture
def cfg(tmp_path):
    p = tmp_path / "lb.toml"
    p.write_text(config_text("eth9", tmp_path) + QUIC_VIP)
    return str(p)


def explain(cfg, cid):
    r = run("explain", "--config", cfg, *FLOW, "--quic-cid", cid)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()[0]


def test_cid_names_its_backend(cfg):
    assert "vip h3 backend 10.1.0.21 (QUIC connection ID 2b0102a1b2c3d4e5: config id 1, " \
           "server_id 258;" in explain(cfg, "2b0102a1b2c3d4e5")
    assert "backend 10.1.0.22 (QUIC" in explain(cfg, "2b:00:07:a1:b2:c3:d4:e5")


@pytest.mark.parametrize("cid,reason", [
    ("e00102a1b2c3d4e5", "config id 7: not routable"),
    ("2b0bb8a1b2c3d4e5", "no backend has server_id 3000"),
    ("2b0009a1b2c3d4e5", "its backend 10.1.0.23 is in maint or down"),
    ("2b0102a1", "4 bytes, shorter than quic_cid_len 8"),
])
def test_cid_not_routed_says_why_and_gives_the_ring(cfg, cid, reason):
    line = explain(cfg, cid)
    assert line.endswith(f"; QUIC connection ID {cid} not routed by it: {reason}"), line
    ring = run("explain", "--config", cfg, *FLOW).stdout.splitlines()[0]
    assert line.startswith(ring), (line, ring)


def test_not_a_quic_vip(cfg):
    r = run("explain", "--config", cfg, "tcp", "198.51.100.7", "1", "192.0.2.10", "80",
            "--quic-cid", "2b0102a1b2c3d4e5")
    assert r.returncode == 0 and r.stdout.splitlines()[0].endswith("not a quic VIP")


@pytest.mark.parametrize("cid", ["zz", "", "00" * 21])
def test_bad_cid_is_one_line(cfg, cid):
    if not cid:
        cid = "-"
    r = run("explain", "--config", cfg, *FLOW, "--quic-cid", cid)
    assert r.returncode == 1 and "--quic-cid" in one_line(r)
