"""Shared fixtures: everything here runs real BPF, so tests need root."""

from __future__ import annotations

import os
import subprocess

import pytest


def pytest_configure(config):
    if os.geteuid() != 0:
        raise pytest.UsageError("xdplb tests load BPF programs: run them as root (make test)")
    if subprocess.run(["mountpoint", "-q", "/sys/fs/bpf"]).returncode != 0:
        subprocess.run(["mount", "-t", "bpf", "-o", "mode=0700", "bpf", "/sys/fs/bpf"],
                       check=True)
