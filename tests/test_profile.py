"""`python -m bench profile`: perf samples of a case charged to xdplb's instructions and
source lines (no timing assertions: only that samples land and resolve)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench/ is run from the repository root, not installed

from bench.profile import run_profile  # noqa: E402
from bench.proginfo import Func, Insn  # noqa: E402


def test_sample_blames_the_instruction_before_its_ip():
    f = Func("f", 0x1000, bytes(12), [Insn(0, 5, "a"), Insn(5, 3, "b"), Insn(8, 4, "c")])
    assert f.insn_before(5).text == "a"   # IP at b's start: a was executing
    assert f.insn_before(7).text == "b"
    assert f.insn_before(8).text == "b"
    assert f.insn_before(12).text == "c"
    assert f.insn_before(0) is None


def test_profile_tcp_hit_resolves_to_bpf_source_lines(tmp_path):
    doc = run_profile(str(tmp_path), case="tcp_hit", seconds=1.0, top=10_000, quiet=True)
    assert doc["path_ok"]
    n = doc["samples_in_program"]
    assert n > 0 and doc["by_instruction"] and doc["by_line"]
    in_bpf = sum(r["samples"] for r in doc["by_line"] if r["source"].startswith("bpf/"))
    assert in_bpf > n / 2
    assert any(r["source"] and r["insn"] for r in doc["by_instruction"])
    on_disk = json.loads((tmp_path / "profile-tcp_hit.json").read_text())
    assert on_disk["by_instruction"] == doc["by_instruction"]
    assert on_disk["machine"]["kernel"] and on_disk["outside"]


def test_unknown_case_is_one_line():
    r = subprocess.run([sys.executable, "-m", "bench", "profile", "--case", "nope"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "unknown case 'nope'" in r.stderr
    assert "Traceback" not in r.stderr
