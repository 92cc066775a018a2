"""Directories root can trust: opened one component at a time without following a
symlink another user could have planted, each checked for who may change it. Callers
then work relative to the returned descriptor, so swapping a path afterwards changes
nothing they touch.

Trusted: owned by root (or by us), and writable by no one else, except sticky
directories such as /tmp or a bpffs mounted 1777, where others may add entries but not
rename or remove ours. The last component must be writable by its owner alone, sticky
or not. A symlink on the way is followed only when root owns it and it sits in a
trusted directory (/var/run -> /run); the last component is never a symlink.
"""

from __future__ import annotations

import os
import stat
from typing import Optional

from .errors import XdplbError

_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_LINKS = 8


def _owner_ok(st: os.stat_result) -> bool:
    return st.st_uid in (0, os.geteuid())


def _problem(st: os.stat_result, last: bool) -> Optional[str]:
    """Why a directory cannot be trusted, or None."""
    if not _owner_ok(st):
        return f"is owned by uid {st.st_uid}, not root"
    others_write = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if others_write and (last or not st.st_mode & stat.S_ISVTX):
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def open_dir(path: str, what: str, create_mode: Optional[int] = 0o700,
             sticky_ok: bool = False) -> tuple[int, bool]:
    """(fd, created) of directory `path`, checked as above; missing components are
    created (the last with create_mode, those before it 0755) unless create_mode is None.
    sticky_ok: the last component may be a sticky directory others write to (a parent
    used only to remove our own entry). `what` names the setting in errors (e.g.
    "bpf_pin_path"). Raises XdplbError."""
    if not os.path.isabs(path):
        raise XdplbError(f"{what} {path} must be an absolute path")
    parts = [p for p in path.split("/") if p]
    fd = os.open("/", _OPEN)
    created, links = False, 0
    try:
        while parts:
            name = parts.pop(0)
            last = not parts
            if name == "..":
                raise XdplbError(f"{what} {path}: use a path without '..'")
            if name == ".":
                continue
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                if create_mode is None:
                    raise XdplbError(f"{what} {path} does not exist") from None
                try:
                    os.mkdir(name, create_mode if last else 0o755, dir_fd=fd)
                    created = last
                except FileExistsError:
                    pass  # made meanwhile: checked below like any other
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                if last or not _owner_ok(st) or links >= MAX_LINKS:
                    raise XdplbError(f"{what} {path}: {name} is a symlink; use the real "
                                     f"path of a directory only root can write")
                links += 1
                target = os.readlink(name, dir_fd=fd)
                parts[:0] = [p for p in target.split("/") if p]
                if target.startswith("/"):
                    os.close(fd)
                    fd = os.open("/", _OPEN)
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise XdplbError(f"{what} {path}: {name} is not a directory")
            nfd = os.open(name, _OPEN, dir_fd=fd)
            os.close(fd)
            fd = nfd
            why = _problem(os.fstat(fd), last and not sticky_ok)
            if why:
                shown = path if last else f"{path}: its parent {name}"
                raise XdplbError(f"{what} {shown} {why}: only root may write it "
                                 f"(remove it, or chown root and chmod go-w)")
        return fd, created
    except BaseException:
        os.close(fd)
        raise
