"""The state file of runtime admin states: all-or-nothing changes (issue 12 finding 6) and
a corrupt file refused with one line naming it (finding 7)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lb.adminstate import AdminStates
from lb.errors import ConfigError, XdplbError

import configtext

GOOD = '{"backends": [{"vip": "web", "backend": "10.0.0.1", "state": "drain"}]}'

# name: how to make the broken state file at `path`
CORRUPT = {
    "garbage": lambda p: p.write_text("this is not json"),
    "empty": lambda p: p.write_text(""),
    "truncated": lambda p: p.write_text(GOOD[:30]),
    "not_utf8": lambda p: p.write_bytes(b'{"backends": ["\xff\xfe"]}'),
    "nul_bytes": lambda p: p.write_bytes(b"\0" * 64),
    "list": lambda p: p.write_text("[]"),
    "string": lambda p: p.write_text('"backends"'),
    "number": lambda p: p.write_text("42"),
    "null": lambda p: p.write_text("null"),
    "backends_not_list": lambda p: p.write_text('{"backends": {"vip": "web"}}'),
    "item_not_object": lambda p: p.write_text('{"backends": [1, 2]}'),
    "item_missing_keys": lambda p: p.write_text('{"backends": [{"vip": "web"}]}'),
    "item_wrong_types": lambda p: p.write_text(
        '{"backends": [{"vip": 1, "backend": ["x"], "state": "drain"}]}'),
    "deep_nesting": lambda p: p.write_text("[" * 100000 + "]" * 100000),
    "huge_integer": lambda p: p.write_text('{"backends": [], "n": ' + "9" * 5000 + "}"),
    "announce_withdrawn_not_bool": lambda p: p.write_text(
        '{"backends": [], "announce_withdrawn": "yes"}'),
    "directory": lambda p: p.mkdir(),
    "fifo": lambda p: os.mkfifo(p),
    "symlink_loop": lambda p: os.symlink(p, p),
}


@pytest.mark.parametrize("variant", sorted(CORRUPT))
def test_corrupt_state_file_is_one_line_naming_it(tmp_path, variant):
    path = tmp_path / "state.json"
    CORRUPT[variant](path)
    with pytest.raises(ConfigError) as err:
        AdminStates(str(path))
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "move it aside" in msg, msg


def test_corrupt_state_file_stops_the_daemon_with_one_line(tmp_path):
    state = tmp_path / "state.json"
    state.write_text("[1, 2")
    cfg = tmp_path / "lb.toml"
    cfg.write_text(configtext.lb("lo", state_file=str(state),
                                 control_socket=f"{tmp_path}/c.sock",
                                 bpf_pin_path="/sys/fs/bpf/xdplb-adminstate-test")
                   + configtext.vip("web", "192.0.2.1", 80, ["10.0.0.1"]))
    r = subprocess.run([sys.executable, "-m", "lb.cli", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(state) in lines[0], r.stderr
    assert not os.path.exists("/sys/fs/bpf/xdplb-adminstate-test")


def test_valid_state_files_load(tmp_path):
    path = tmp_path / "state.json"
    for text, want in ((GOOD, "drain"), ("{}", None), ('{"backends": []}', None),
                       ('{"backends": [{"vip": "web", "backend": "10.0.0.1", '
                        '"state": "bogus"}]}', None)):
        path.write_text(text)
        assert AdminStates(str(path)).get("web", "10.0.0.1") == want, text


def test_announce_withdrawn_persists_beside_the_backends(tmp_path):
    path = tmp_path / "state.json"
    path.write_text(GOOD)
    states = AdminStates(str(path))
    assert not states.announce_withdrawn
    states.set_announce_withdrawn(True)
    again = AdminStates(str(path))
    assert again.announce_withdrawn and again.get("web", "10.0.0.1") == "drain"
    again.set("web", "10.0.0.1", "maint")          # a backend change keeps it
    assert AdminStates(str(path)).announce_withdrawn
    again.set_announce_withdrawn(False)
    assert not AdminStates(str(path)).announce_withdrawn
    assert AdminStates(str(path)).get("web", "10.0.0.1") == "maint"


def test_failed_write_changes_nothing(tmp_path):
    path = tmp_path / "sub" / "state.json"
    states = AdminStates(str(path))
    states.set("web", "10.0.0.1", "maint")
    before = path.read_text()
    # the directory becomes a file: no temp file, no rename can succeed
    for name in os.listdir(path.parent):
        os.unlink(path.parent / name)
    os.rmdir(path.parent)
    path.parent.write_text("in the way")
    with pytest.raises(XdplbError) as err:
        states.set("web", "10.0.0.1", "drain")
    assert "nothing changed" in str(err.value)
    assert states.get("web", "10.0.0.1") == "maint"
    assert states.get("web", "10.0.0.2") is None
    # and a later successful change persists only itself, not the failed one
    path.parent.unlink()
    states.set("web", "10.0.0.2", "drain")
    assert AdminStates(str(path)).get("web", "10.0.0.1") == "maint"

