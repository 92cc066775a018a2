"""One xdplb per pin path and per interface: exclusive locks taken before anything is
touched (no attach, no map write, no unpin), so a second instance started by mistake
exits at once instead of replacing the live program and rewriting its maps.

The locks are flock()s on files in LOCK_DIR (a root-only directory, checked like the pin
directory); each file holds the pid of the instance that holds it. The kernel drops the
locks when the process ends, however it ends. Lock files are never removed: removing
one while another process waits on it would let two instances hold "the" lock.
"""

from __future__ import annotations

import fcntl
import os
import urllib.parse
from typing import Optional

from .errors import XdplbError
from .safedir import open_dir

LOCK_DIR = "/run/xdplb/locks"


def _netns_id() -> int:
    """Interfaces are named per network namespace: two instances in different namespaces
    may both use "eth0"."""
    return os.stat("/proc/self/ns/net").st_ino


class InstanceLocks:
    """Holds the locks of one running instance until close() (or the process ends)."""

    def __init__(self, lock_dir: str = LOCK_DIR):
        self.lock_dir = lock_dir
        self.fds: list[int] = []

    def acquire(self, pin_path: str, interfaces: list[str]) -> None:
        """Lock the pin path and each interface; XdplbError (exit 2) naming the pid of
        the instance that holds one of them."""
        dfd, _ = open_dir(self.lock_dir, "the lock directory")
        try:
            keys = [(f"pin-{urllib.parse.quote(pin_path.rstrip('/') or '/', safe='')}",
                     f"pin path {pin_path}")]
            netns = _netns_id()
            keys += [(f"if-{netns}-{name}", f"interface {name}")
                     for name in dict.fromkeys(interfaces)]
            for fname, what in keys:
                self._take(dfd, fname, what)
        except BaseException:
            self.close()
            raise
        finally:
            os.close(dfd)

    def _take(self, dfd: int, fname: str, what: str) -> None:
        fd = os.open(fname, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=dfd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            who = f"pid {pid}" if pid else "another process"
            raise XdplbError(f"another xdplb ({who}) runs on {what}: stop it first, or "
                             f"give this one another interface and bpf_pin_path") from None
        except BaseException:
            os.close(fd)
            raise
        self.fds.append(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def _read_pid(fd: int) -> Optional[int]:
    try:
        return int(os.pread(fd, 32, 0).split()[0])
    except (OSError, ValueError, IndexError):
        return None
