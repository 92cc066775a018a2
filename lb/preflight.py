"""Checks before touching the kernel, each failing with one line: cause and fix."""

from __future__ import annotations

import os
import platform
import resource
import subprocess

from .errors import XdplbError

CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 12, 21, 38, 39
# What the daemon needs, and nothing more (tests/test_service.py; the unit's
# CapabilityBoundingSet lists the same). Without CAP_BPF nothing loads; without
# CAP_NET_ADMIN the devmap (tx_port) cannot be created nor the program attached; without
# CAP_PERFMON the verifier rejects the program (EACCES: the pointer rules for the
# unprivileged). CAP_SYS_ADMIN stands in for CAP_BPF and CAP_PERFMON (kernels before 5.8
# know only it).
REQUIRED_CAPS = {"CAP_BPF": CAP_BPF, "CAP_NET_ADMIN": CAP_NET_ADMIN,
                 "CAP_PERFMON": CAP_PERFMON}
SYS_ADMIN_COVERS = ("CAP_BPF", "CAP_PERFMON")


def effective_caps() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def missing_caps(caps: int) -> list[str]:
    """The REQUIRED_CAPS an effective capability mask lacks."""
    admin = bool(caps & (1 << CAP_SYS_ADMIN))
    return [name for name, bit in REQUIRED_CAPS.items()
            if not caps & (1 << bit) and not (admin and name in SYS_ADMIN_COVERS)]


def check_privileges() -> None:
    """The capabilities, not uid 0: root with a smaller bounding set fails here too."""
    missing = missing_caps(effective_caps())
    if missing and os.geteuid() != 0:
        raise XdplbError(f"xdplb must run as root (or with {', '.join(REQUIRED_CAPS)}): "
                         f"run it with sudo")
    if missing:
        raise XdplbError(f"missing capability {', '.join(missing)} (xdplb needs "
                         f"{', '.join(REQUIRED_CAPS)}): run it as root, or grant them "
                         f"(AmbientCapabilities= in the unit, setpriv --ambient-caps)")


# The data path's lock-free reads (connection table, VIP index, QUIC cache) are seqlocks
# without read barriers, which BPF lacks: right only where loads are not reordered with
# loads, as on x86-64 (the JIT's target the ordering was checked for).
ORDERED_LOADS = ("x86_64",)


def check_architecture(machine: str = "") -> None:
    machine = machine or platform.machine()
    if machine not in ORDERED_LOADS:
        raise XdplbError(f"xdplb's lock-free map reads need x86-64 memory ordering and this "
                         f"host is {machine}: run xdplb on an x86-64 host")


def raise_fd_limit() -> None:
    """Soft open-files limit up to the hard one: the daemon holds maps, probes and
    clients' connections, and 1024 (the usual soft default) is an easy ceiling for
    anyone who can connect to it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def fs_type(path: str) -> str:
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
    if fs_type(parent) != "bpf" and parent.startswith("/sys/fs/bpf"):
        # mode 0700 as systemd mounts it: a bpffs mounted without a mode is 1777, where
        # any user may create the pin directory before xdplb does
        r = subprocess.run(["mount", "-t", "bpf", "-o", "mode=0700", "bpf", "/sys/fs/bpf"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise XdplbError(f"bpffs is not mounted at /sys/fs/bpf and mounting it failed "
                             f"({r.stderr.strip()}): mount -t bpf -o mode=0700 bpf "
                             f"/sys/fs/bpf")
    if fs_type(parent) != "bpf":
        raise XdplbError(f"bpf_pin_path {pin_path} is not on a bpf filesystem: use a path "
                         f"under /sys/fs/bpf")
