"""The package: a wheel built by `python -m build` from a copy of the sources, installed
into a fresh venv outside the checkout, carries the BPF objects (in the cffi extension's
skeletons) and runs: `xdplb check`, and data-path tests with `lb` imported from the
wheel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_PYTHON = getattr(sys, "_base_executable", None) or shutil.which("python3")


def run(argv, cwd, timeout=600) -> str:
    r = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{argv}: {r.stdout[-2000:]}{r.stderr[-3000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("package")
    src = tmp / "src"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=HERE, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if os.path.isfile(os.path.join(HERE, name)):  # a file deleted but not committed
            os.makedirs(src / os.path.dirname(name), exist_ok=True)
            shutil.copy2(os.path.join(HERE, name), src / name)
    env = tmp / "venv"
    run([BASE_PYTHON, "-m", "venv", str(env)], tmp)
    py = str(env / "bin" / "python")
    run([py, "-m", "pip", "install", "-q", "build", "setuptools>=64", "wheel", "cffi"], tmp)
    run([py, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp / "dist"),
         str(src)], tmp)
    wheels = list((tmp / "dist").glob("xdplb-*.whl"))
    assert len(wheels) == 1
    run([py, "-m", "pip", "install", "-q", f"{wheels[0]}[test]"], tmp)
    return tmp, env, src


def test_wheel_carries_the_extension(venv):
    tmp, env, _ = venv
    out = run([str(env / "bin" / "python"), "-c",
               "import lb, lb._native; print(lb.__file__); print(lb._native.__file__)"], tmp)
    for path in out.split():
        assert path.startswith(str(env)), out  # the wheel's, not the checkout's


def test_check_from_the_wheel(venv):
    tmp, env, src = venv
    out = run([str(env / "bin" / "xdplb"), "check", "--config", str(src / "config/lb.toml")],
              tmp)
    assert out.startswith("ok: ")


def test_datapath_tests_from_the_wheel(venv):
    tmp, env, src = venv
    out = run([str(env / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider",
               str(src / "tests/test_datapath.py"), "-k",
               "rows_cover or forward_rows_spread or gue_checksum"], tmp)
    assert " passed" in out and "failed" not in out
