"""Hostile input to the config reader and the CLI (issue 12, findings 9 and 12): files
rewritten in place while read, oversized and pathologically deep files, numbers beyond
Python's int-string limit, control characters echoed back, impossible map sizes, offline
`explain` with a bad flow, and a JSON log that stays JSON."""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import time
import warnings

import pytest

from lb import capacity, log as logmod
from lb.config import check, load_config, parse_config
from lb.errors import ConfigError

from test_cli import cfg, one_line, run  # noqa: F401 - cfg is a fixture
from configtext import MINIMAL, vip

TWO_VIPS = MINIMAL + vip("api", "192.0.2.11", 443, backends=["10.1.0.12"])


# --- finding 9: a file rewritten in place ------------------------------------------------

def test_file_rewritten_in_place_never_yields_a_prefix(tmp_path):
    """A writer truncates and rewrites the file in two parts, over and over; every load
    either sees the whole file or refuses it, never a valid prefix (one VIP of two)."""
    path = tmp_path / "lb.toml"
    path.write_text(TWO_VIPS)
    cut = TWO_VIPS.index("[[vip]]\nname = \"api\"")
    stop = threading.Event()

    def writer():
        while not stop.is_set():
            with open(path, "r+") as f:
                f.truncate(0)
                f.write(TWO_VIPS[:cut])
                f.flush()
                time.sleep(0.002)
                f.write(TWO_VIPS[cut:])
            time.sleep(0.002)
    t = threading.Thread(target=writer, daemon=True)
    t.start()
    seen = []
    try:
        for _ in range(15):
            try:
                seen.append(len(load_config(path).vips))
            except ConfigError as e:
                seen.append(str(e))
    finally:
        stop.set()
        t.join()
    assert 1 not in seen, seen
    assert len(load_config(path).vips) == 2  # once it holds still, it loads


def test_a_quiet_file_loads(tmp_path):
    path = tmp_path / "lb.toml"
    path.write_text(TWO_VIPS)
    assert len(load_config(path).vips) == 2


def test_fifo_as_config_does_not_hang(tmp_path):
    path = tmp_path / "lb.toml"
    os.mkfifo(path)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(path)


# --- finding 12: sizes and shapes the parser must never see -------------------------------

@pytest.mark.parametrize("text,expect", [
    ("[lb]\ninterface = \"eth0\"\nx = " + "9" * 5000 + "\n", "a number is too long"),
    (".".join(["a"] * 20000) + " = 1\n", "dotted key has 20000 parts"),
    ("[" + ".".join(["a"] * 40) + "]\n", "dotted key has 40 parts"),
    ("a = " + "[" * 200 + "]" * 200 + "\n", "nested 200 deep"),
    ("a = " + "{b = " * 100 + "1" + "}" * 100 + "\n", "nested 100 deep"),
])
def test_absurd_documents_are_one_line(text, expect):
    t0 = time.process_time()
    with pytest.raises(ConfigError) as err:
        parse_config(text)
    assert len(err.value.problems) == 1 and expect in err.value.problems[0], err.value
    assert time.process_time() - t0 < 5  # not a timing claim: the old parser took minutes


def test_dots_inside_strings_and_floats_are_not_keys():
    text = MINIMAL.replace('[lb]\n', '[lb]\n# ' + "." * 100 + "\n") + \
        '\n[health]\npath = "/' + "a." * 100 + '"\ninterval = 1.5\ntimeout = 0.5\ntype = "http"\n'
    assert parse_config(text).health.interval == 1.5


def test_oversized_file_is_refused_before_parsing(tmp_path):
    path = tmp_path / "lb.toml"
    path.write_text(MINIMAL + "#" * (5 << 20) + "\n")
    with pytest.raises(ConfigError, match="larger than 4 MiB"):
        load_config(path)


def test_huge_integer_on_the_cli_and_check(tmp_path):
    path = tmp_path / "lb.toml"
    path.write_text(MINIMAL.replace("port = 80", "port = " + "9" * 5000))
    r = run("check", "--config", str(path))
    assert r.returncode == 1 and "too long" in r.stdout and "Traceback" not in r.stderr
    r = run("explain", "--config", str(path), "tcp", "1.2.3.4", "9" * 5000, "192.0.2.10", "80")
    assert r.returncode != 0 and "Traceback" not in r.stderr


@pytest.mark.parametrize("args,expect", [
    (("tcp", "1.2.3.4", "70000", "192.0.2.10", "80"), "sport 70000: not a port"),
    (("tcp", "1.2.3.4", "1000", "192.0.2.10", "-1"), "dport -1: not a port"),
    (("tcp", "1.2.3.400", "1000", "192.0.2.10", "80"), "src 1.2.3.400: not an IP address"),
    (("udp", "1.2.3.4", "1000", "nope", "80"), "dst nope: not an IP address"),
    (("tcp", "2001:db8::1", "1000", "192.0.2.10", "80"), "one is IPv4, the other IPv6"),
])
def test_offline_explain_bad_flow_is_one_line(cfg, args, expect):  # noqa: F811
    r = run("explain", "--config", cfg(), *args)
    assert r.returncode == 1 and expect in one_line(r), r.stderr


def test_control_characters_are_escaped(tmp_path):
    raw = "w\u2028e\x7fb\x85x"
    toml = "w\\u2028e\\u007fb\\u0085x"  # TOML escapes: the parsed values hold raw
    path = tmp_path / "lb.toml"
    path.write_text(MINIMAL.replace('name = "web"', f'name = "{toml}"')
                    .replace("[lb]\n", f'[lb]\n"k{toml}" = 1\n'))
    ok, lines = check(path)
    text = "\n".join(lines)
    assert not ok and lines
    for c in "\u2028\x7f\x85":
        assert c not in text, repr(text)
    assert "\\u2028" in text and "\\u007f" in text and "\\u0085" in text, text
    r = run("explain", "--config", str(path), "tcp", raw, "1", "192.0.2.10", "80")
    assert r.returncode == 1 and "\u2028" not in r.stderr and "\\u2028" in r.stderr, r.stderr


def test_map_memory_beyond_the_machine_is_refused(tmp_path):
    path = tmp_path / "lb.toml"
    path.write_text(MINIMAL.replace("[lb]\n", "[lb]\nflow_table_size = 4000000000\n"))
    ok, lines = check(path)
    assert not ok and len(lines) == 1 and lines[0].startswith("lb.flow_table_size: "), lines
    # 2^24 backends on a 64-CPU machine with 4 GiB: 64 GiB of backend slots
    cfg_ = parse_config(MINIMAL.replace("[lb]\n", "[lb]\nmax_backends = 16777216\n"))
    problem = capacity.memory_problem(cfg_, total=4 << 30, ncpus=64)
    assert problem and problem.startswith("lb.max_backends: "), problem
    assert capacity.memory_problem(parse_config(MINIMAL), total=4 << 30, ncpus=64) is None


# --- finding 12: every line JSON with log_format = "json" ---------------------------------

def _all_json(text: str) -> list[dict]:
    lines = text.strip().splitlines()
    assert lines, "no output"
    return [json.loads(line) for line in lines]


def test_json_log_covers_library_warnings_and_thread_crashes():
    out = io.StringIO()
    log = logmod.setup("json", stream=out)
    log.info("hello")
    logging.getLogger("pyroute2.test").warning("a library %s", "warning")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        logging.captureWarnings(True)
        warnings.warn("deprecated thing", DeprecationWarning)
    t = threading.Thread(target=lambda: 1 / 0)
    t.start()
    t.join()
    events = _all_json(out.getvalue())
    text = json.dumps(events)
    assert "a library warning" in text and "deprecated thing" in text
    assert any(e.get("event") == "thread_crashed" and "ZeroDivisionError" in e["exception"]
               for e in events), events
    logmod.setup("console")


def test_json_log_covers_errors_before_and_at_start(cfg, tmp_path):  # noqa: F811
    good = open(cfg("eth9")).read().replace("[lb]\n", '[lb]\nlog_format = "json"\n')
    path = tmp_path / "json.toml"
    path.write_text(good)
    r = run("--config", str(path))  # no such interface: an error after the logger is up
    assert r.returncode == 2
    assert [e["event"] for e in _all_json(r.stderr)] == ["start_failed"], r.stderr
    path.write_text(good.replace("port = 80", "port = 70000"))  # before it is up
    r = run("--config", str(path))
    assert r.returncode == 1
    assert [e["event"] for e in _all_json(r.stderr)] == ["config_invalid"], r.stderr
