"""The pin directory, held open: every pin, adoption and unpin goes through the
descriptor of the directory checked at start (lb/safedir.py: root-owned, writable by
root only, created 0700, never a symlink), so swapping the path later redirects nothing.

libbpf's bpf_obj_pin/bpf_obj_get take paths (BPF_F_PATH_FD needs libbpf 1.3 and kernel
6.5; Debian 12 has libbpf 1.1): they get /proc/self/fd/N/NAME, which the kernel resolves
through the open directory, not through its name. Only names this instance pinned or
adopted are ever removed.
"""

from __future__ import annotations

import os
import stat
from typing import Optional

from .native import lib, obj_pin
from .errors import BpfError, XdplbError
from .safedir import open_dir


class PinDir:
    def __init__(self, path: str):
        self.path = path.rstrip("/") or "/"
        self.fd, self.created = open_dir(self.path, "bpf_pin_path")
        self.owned: set[str] = set()  # pinned or adopted by this instance

    def _proc(self, name: str) -> bytes:
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"not a pin name: {name!r}")
        return f"/proc/self/fd/{self.fd}/{name}".encode()

    def display(self, name: str) -> str:
        return f"{self.path}/{name}"

    def kind(self, name: str) -> Optional[str]:
        """None (nothing there), "pin" (a pinned object: a regular file on bpffs) or
        what else is there ("directory", "symlink", "other")."""
        try:
            st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if stat.S_ISREG(st.st_mode):
            return "pin"
        if stat.S_ISDIR(st.st_mode):
            return "directory"
        return "symlink" if stat.S_ISLNK(st.st_mode) else "other"

    def get(self, name: str) -> int:
        """An fd of the object pinned as `name` (a pin, never a symlink); adopts it."""
        if self.kind(name) != "pin":
            raise XdplbError(f"{self.display(name)} is not a pinned object")
        fd = lib.bpf_obj_get(self._proc(name))
        if fd < 0:
            raise BpfError(f"opening pinned object {self.display(name)}", -fd)
        self.owned.add(name)
        return fd

    def pin(self, fd: int, name: str) -> None:
        obj_pin(fd, self._proc(name).decode())
        self.owned.add(name)

    def clear(self, name: str) -> Optional[str]:
        """Make room for our own pin `name`: removes a pin, or an empty directory, that
        is in the way; returns what was removed (None: nothing was there). XdplbError
        for what cannot be removed safely."""
        what = self.kind(name)
        if what is None:
            return None
        if what == "directory":
            try:
                os.rmdir(name, dir_fd=self.fd)
            except OSError as e:
                raise XdplbError(f"{self.display(name)} is a directory xdplb cannot remove "
                                 f"({e.strerror}): move it out of bpf_pin_path") from None
        else:
            os.unlink(name, dir_fd=self.fd)  # a pin or a symlink itself, never its target
        self.owned.discard(name)
        return what

    def unpin(self, name: str) -> None:
        """Remove `name` if this instance pinned or adopted it."""
        if name in self.owned and self.kind(name) == "pin":
            os.unlink(name, dir_fd=self.fd)
        self.owned.discard(name)

    def remove(self) -> None:
        """Remove the directory if it is empty, through its parent (trusted as well)."""
        parent, base = os.path.split(self.path)
        try:
            pfd, _ = open_dir(parent or "/", "bpf_pin_path's parent", create_mode=None,
                              sticky_ok=True)
        except XdplbError:
            return
        try:
            st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
            mine = os.fstat(self.fd)
            if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
                os.rmdir(base, dir_fd=pfd)
        except OSError:
            pass  # not empty (another program's pins), or gone
        finally:
            os.close(pfd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
