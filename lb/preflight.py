"""Checks before touching the kernel, each failing with one line: cause and fix."""

from __future__ import annotations

import os
import resource
import subprocess

from .errors import XdplbError

CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF = 12, 21, 39


def _caps() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def check_privileges() -> None:
    caps = _caps()
    has_bpf = caps & (1 << CAP_BPF) or caps & (1 << CAP_SYS_ADMIN)
    if os.geteuid() != 0 and not (has_bpf and caps & (1 << CAP_NET_ADMIN)):
        raise XdplbError("xdplb must run as root (or with CAP_BPF and CAP_NET_ADMIN): "
                         "run it with sudo")


def raise_fd_limit() -> None:
    """Soft open-files limit up to the hard one: the daemon holds maps, probes and
    clients' connections, and 1024 (the usual soft default) is an easy ceiling for
    anyone who can connect to it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _fs_magic(path: str) -> str:
    best, fstype = "", ""
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            mnt, typ = parts[1], parts[2]
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, fstype = mnt, typ
    return fstype


def ensure_bpffs(pin_path: str) -> None:
    """The pin path must live on a bpffs; mount /sys/fs/bpf if nothing is mounted there."""
    parent = os.path.dirname(pin_path.rstrip("/")) or "/"
    if _fs_magic(parent) != "bpf" and parent.startswith("/sys/fs/bpf"):
        # mode 0700 as systemd mounts it: a bpffs mounted without a mode is 1777, where
        # any user may create the pin directory before xdplb does
        r = subprocess.run(["mount", "-t", "bpf", "-o", "mode=0700", "bpf", "/sys/fs/bpf"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise XdplbError(f"bpffs is not mounted at /sys/fs/bpf and mounting it failed "
                             f"({r.stderr.strip()}): mount -t bpf -o mode=0700 bpf "
                             f"/sys/fs/bpf")
    if _fs_magic(parent) != "bpf":
        raise XdplbError(f"bpf_pin_path {pin_path} is not on a bpf filesystem: use a path "
                         f"under /sys/fs/bpf")
