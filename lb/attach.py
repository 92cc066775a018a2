"""Attaching the XDP program to the ingress interface, replacing our earlier program
without a gap (XDP_FLAGS_REPLACE), in native mode or generic mode."""

from __future__ import annotations

import os
from typing import Optional

from .errors import XdplbError
from .native import lib as native_lib, xdp_attach, xdp_detach, xdp_query


def attach(ifindex: int, ifname: str, prog_fd: int, xdp_mode: str, log) -> str:
    """Attach prog_fd to ifindex; xdp_mode "auto" tries native, then generic. Returns the
    mode used. A program already attached in that mode is replaced atomically, one in
    the other mode is detached afterwards."""
    q = xdp_query(ifindex)
    modes = ["native", "generic"] if xdp_mode == "auto" else [xdp_mode]
    current = {"native": q["drv"], "generic": q["skb"]}
    last_err: Optional[Exception] = None
    for mode in modes:
        old_fd = -1
        if current[mode]:
            old_fd = native_lib.bpf_prog_get_fd_by_id(current[mode])
        try:
            xdp_attach(ifindex, prog_fd, mode, old_prog_fd=old_fd)
            other = "generic" if mode == "native" else "native"
            if current.get(other):
                xdp_detach(ifindex, other)
            return mode
        except XdplbError as e:
            last_err = e
            if mode == "native" and len(modes) > 1:
                log.info("native_xdp_unavailable", interface=ifname, error=str(e),
                         fallback="generic")
        finally:
            if old_fd >= 0:
                os.close(old_fd)
    raise XdplbError(f"cannot attach XDP to {ifname}: {last_err}")
