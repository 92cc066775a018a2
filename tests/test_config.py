"""Configuration parsing and validation (lb/config.py): the example, defaults, and a corpus
of broken files (tests/configs/*.toml, each headed by `# expect: <substring>` lines: the
file must produce exactly one problem per line, each containing its substring)."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path

import pytest

from lb.config import Config, HealthSection, LbSection, check, load_config, parse_config
from lb.errors import ConfigError
from lb.vipconfig import Backend, Vip

import configtext
from configtext import MINIMAL

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "lb.toml"
CORPUS = sorted((Path(__file__).parent / "configs").glob("*.toml"))



def problems_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    return info.value.problems


def expectations(path: Path) -> list[str]:
    return [line[len("# expect: "):].rstrip("\n")
            for line in path.read_text().splitlines() if line.startswith("# expect: ")]


# --- the example and defaults -------------------------------------------------------------

def test_example_loads_and_sets_every_key():
    config = load_config(EXAMPLE)
    assert config.source == EXAMPLE
    assert check(EXAMPLE) == (True, ["ok: 3 vips, 7 backends"])
    # every [lb] key is written out in the example (the contract asks for all of them)
    text = EXAMPLE.read_text()
    for f in dataclasses.fields(LbSection):
        assert f"\n{f.name} = " in text, f"config/lb.toml lacks lb.{f.name}"
    for f in dataclasses.fields(HealthSection):
        assert f"{f.name} = " in text, f"config/lb.toml lacks health.{f.name}"
    web = config.vip("web")
    assert web.health.type == "http" and web.health.port == 8080 and web.health.path == "/healthz"
    assert [b.state for b in web.backends] == ["active", "active", "drain"]
    assert web.backends[1].weight == 2
    assert config.lb.metrics_address == ("127.0.0.1", 9733)
    dns6 = config.vip("dns6")
    assert dns6.port == 0 and dns6.proto == 17 and dns6.hash_src_only
    assert dns6.health.port == 53
    assert dns6.health.interval == config.health.interval  # inherited from [health]
    assert dns6.backend("FD00:1:0::11") is dns6.backends[0]
    h3 = config.vip("h3")
    assert (h3.quic, h3.quic_server_id_len, h3.quic_cid_len) == (True, 2, 8)
    assert [b.server_id for b in h3.backends] == [1, 2]
    for f in ("quic", "quic_server_id_len", "quic_cid_len", "server_id"):
        assert f"\n{f} = " in text, f"config/lb.toml lacks {f}"


def test_defaults():
    config = parse_config(MINIMAL)
    assert isinstance(config, Config)
    assert config.lb == LbSection(interface="eth0")
    lb = config.lb
    assert (lb.egress_interface, lb.xdp_mode, lb.encap, lb.gue_port) == (None, "auto", "ipip", 6080)
    assert (lb.source_v4, lb.source_v6, lb.metrics_listen, lb.metrics_address) == (None,) * 4
    assert (lb.ring_size, lb.flow_table_size, lb.flow_insert_limit) == (65537, 1000000, 25000)
    assert lb.too_big_per_sec == 1000
    assert lb.bpf_pin_path == "/sys/fs/bpf/xdplb"
    assert lb.control_socket == "/run/xdplb/control.sock"
    assert lb.state_file == "/var/lib/xdplb/state.json"
    assert (lb.log_format, lb.keep_datapath_on_exit) == ("console", False)
    assert lb.answer_ping is True
    assert (lb.max_vips, lb.max_backends) == (4096, 65536)
    assert config.health == HealthSection(type="tcp", port=None, path="/", expect_status=200,
                                          interval=2.0, timeout=1.0, rise=2, fall=3)
    assert config.vips == (Vip(name="web", address=ipaddress.ip_address("192.0.2.10"), port=80,
                               protocol="tcp", hash="5tuple", all_down="drop",
                               health=dataclasses.replace(config.health, port=80),
                               backends=(Backend(ipaddress.ip_address("10.1.0.11"), 1,
                                                 "active"),)),)
    assert config.vips[0].ident == (ipaddress.ip_address("192.0.2.10"), 80, 6)
    assert config.source is None and config.backend_count == 1


def test_too_big_per_sec():
    """lb.too_big_per_sec: ICMP too-big answers per second per CPU, 0 (none) .. u32."""
    def text(value) -> str:
        return configtext.lb(too_big_per_sec=value) + configtext.vip("web", "192.0.2.10")
    for value in (0, 50, 4294967295):
        assert parse_config(text(value)).lb.too_big_per_sec == value
    for value, problem in ((-1, "-1 out of range 0..4294967295"),
                           (4294967296, "4294967296 out of range 0..4294967295"),
                           (1.5, "expected an integer, got float")):
        assert problems_of(text(value)) == [f"lb.too_big_per_sec: {problem}"]


def test_dataclasses_are_frozen():
    config = parse_config(MINIMAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lb.ring_size = 7  # type: ignore[misc]
    assert isinstance(config.vips, tuple) and isinstance(config.vips[0].backends, tuple)


def test_vip_health_merges_over_defaults():
    config = parse_config(MINIMAL.replace('[[vip.backend]]', '[vip.health]\nrise = 5\n\n'
                                          '[[vip.backend]]')
                          + '\n[health]\ntype = "http"\nport = 8080\ninterval = 4\n')
    assert config.health.interval == 4.0 and isinstance(config.health.interval, float)
    h = config.vips[0].health
    assert (h.type, h.port, h.interval, h.timeout, h.rise, h.fall) == ("http", 8080, 4.0, 1.0, 5, 3)


def test_health_none_on_any_port_needs_no_port():
    config = parse_config(MINIMAL.replace("port = 80", "port = 0").replace(
        '[[vip.backend]]', '[vip.health]\ntype = "none"\n\n[[vip.backend]]'))
    assert config.vips[0].health.port == 0


def test_ipv6_and_mixed_families_are_fine():
    config = parse_config(MINIMAL.replace("192.0.2.10", "2001:db8::10")
                          + '\n[[vip.backend]]\naddress = "fd00::11"\nweight = 0\n')
    assert [b.address.version for b in config.vips[0].backends] == [4, 6]
    config = parse_config(MINIMAL.replace('interface = "eth0"', 'interface = "eth0"\n'
                                          'encap = "gue"\nsource_v6 = "fd00::2"\n'
                                          'metrics_listen = "[::1]:9733"'))
    assert config.lb.source_v6 == ipaddress.IPv6Address("fd00::2")
    assert config.lb.metrics_address == ("::1", 9733)


def test_ring_size_limit_is_per_largest_vip():
    def small(ring: int) -> str:
        return configtext.lb(ring_size=ring) + configtext.vip("small", "192.0.2.10")
    big = configtext.vip("big", "192.0.2.10", 81, backends=[
        "10.1.0.11", *(f"10.1.0.{i}" for i in range(100, 110))])  # 11: a prime > 1100
    assert problems_of(small(1009) + big) == [
        'lb.ring_size: 1009 is too small for vip "big" with 11 backends (needs a prime > 1100, '
        'e.g. 1103)']
    assert parse_config(small(1103) + big).lb.ring_size == 1103


# --- the corpus of broken files -----------------------------------------------------------

@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_broken_config(path: Path):
    expected = expectations(path)
    assert expected, f"{path.name} has no '# expect:' line"
    ok, problems = check(path)
    assert not ok
    assert all("\n" not in p and p.strip() == p and p for p in problems), problems
    assert all("Traceback" not in p for p in problems)
    assert len(problems) == len(expected), problems
    for want in expected:
        assert any(want in p for p in problems), f"{want!r} not in {problems}"


def test_corpus_is_large():
    assert len(CORPUS) >= 40


def test_config_error_lists_every_problem():
    with pytest.raises(ConfigError) as info:
        load_config(ROOT / "tests" / "configs" / "many_problems.toml")
    err = info.value
    assert len(err.problems) == 7
    assert str(err) == "\n".join(err.problems)
    assert err.exit_code == 1


# --- files that cannot be read ------------------------------------------------------------

def test_missing_file(tmp_path: Path):
    path = tmp_path / "nope.toml"
    assert check(path) == (False, [f"{path}: no such file"])
    with pytest.raises(ConfigError, match="no such file"):
        load_config(str(path))


def test_directory(tmp_path: Path):
    ok, problems = check(tmp_path)
    assert not ok and problems == [f"{tmp_path}: is a directory, not a config file"]


def test_not_utf8(tmp_path: Path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(MINIMAL.replace("web", "caf\xe9").encode("latin-1"))
    ok, problems = check(path)
    assert not ok and len(problems) == 1 and "not UTF-8" in problems[0]


def test_bom_is_accepted(tmp_path: Path):
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + MINIMAL.encode())
    assert check(path) == (True, ["ok: 1 vips, 1 backends"])


def test_empty_file():
    assert problems_of("") == ["lb.interface: required key is missing"]


def test_no_vips_is_valid():
    config = parse_config('[lb]\ninterface = "eth0"\n')
    assert config.vips == () and config.backend_count == 0


def test_deep_nesting_is_one_problem():
    problems = problems_of("x = " + "[" * 5000 + "]" * 5000 + "\n")
    assert len(problems) == 1 and "\n" not in problems[0]


def test_quic_keys_outside_a_quic_vip_are_accepted():
    """As in the contract's example: the QUIC keys on a TCP VIP with quic = false, and
    server IDs that repeat there, are not errors (they only matter with quic = true)."""
    text = MINIMAL + "server_id = 7\n\n[[vip.backend]]\naddress = \"10.1.0.12\"\nserver_id = 7\n"
    text = text.replace('port = 80\n', 'port = 80\nquic = false\nquic_server_id_len = 2\n'
                                       'quic_cid_len = 8\n')
    vip = parse_config(text).vips[0]
    assert not vip.quic and [b.server_id for b in vip.backends] == [7, 7]
