"""Thin typed wrapper over the cffi extension `lb._native` (libbpf + our skeletons).

Every failing call raises BpfError with errno and a sentence saying what failed; a program
the verifier rejects raises VerifierError carrying the verifier's log.
"""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass
from typing import Iterator, Optional

from .errors import BpfError, VerifierError

try:
    from ._native import ffi, lib
except ImportError as e:  # pragma: no cover - only without a build
    raise ImportError(f"xdplb's native extension is not built ({e}); run: make build") from e

# map types this module needs by number (bpf_map_type in linux/bpf.h)
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_PERCPU_HASH = 10
PERCPU_TYPES = {BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY,
                BPF_MAP_TYPE_LRU_PERCPU_HASH}

XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = range(5)
VERDICTS = {XDP_ABORTED: "aborted", XDP_DROP: "drop", XDP_PASS: "pass", XDP_TX: "tx",
            XDP_REDIRECT: "redirect"}

XDP_MODES = {"native": lib.XDP_FLAGS_DRV_MODE, "generic": lib.XDP_FLAGS_SKB_MODE}


def _check(ret: int, what: str) -> int:
    if ret < 0:
        raise BpfError(what, -ret)
    return ret


def num_cpus() -> int:
    return _check(lib.libbpf_num_possible_cpus(), "counting possible CPUs")


class Map:
    """A BPF map by fd. Keys and values are bytes (or ctypes structures)."""

    def __init__(self, fd: int, name: str, map_type: int, key_size: int, value_size: int,
                 max_entries: int, owns_fd: bool = False):
        self.fd, self.name, self.type = fd, name, map_type
        self.key_size, self.value_size, self.max_entries = key_size, value_size, max_entries
        self.percpu = map_type in PERCPU_TYPES
        self.ncpus = num_cpus() if self.percpu else 1
        self._slot = (value_size + 7) // 8 * 8 if self.percpu else value_size
        self._owns = owns_fd

    @classmethod
    def from_fd(cls, fd: int, owns_fd: bool = True) -> "Map":
        info = ffi.new("struct bpf_map_info *")
        size = ffi.new("__u32 *", ffi.sizeof("struct bpf_map_info"))
        _check(lib.bpf_obj_get_info_by_fd(fd, info, size), f"reading info of map fd {fd}")
        return cls(fd, ffi.string(info.name).decode(), info.type, info.key_size,
                   info.value_size, info.max_entries, owns_fd)

    @classmethod
    def from_pin(cls, path: str) -> "Map":
        fd = lib.bpf_obj_get(path.encode())
        if fd < 0:
            raise BpfError(f"opening pinned map {path}", -fd)
        return cls.from_fd(fd)

    def info(self) -> dict:
        info = ffi.new("struct bpf_map_info *")
        size = ffi.new("__u32 *", ffi.sizeof("struct bpf_map_info"))
        _check(lib.bpf_obj_get_info_by_fd(self.fd, info, size), f"reading info of map {self.name}")
        return {"type": info.type, "id": info.id, "key_size": info.key_size,
                "value_size": info.value_size, "max_entries": info.max_entries,
                "map_flags": info.map_flags}

    def close(self) -> None:
        if self._owns and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _key(self, key) -> bytes:
        k = bytes(key)
        if len(k) != self.key_size:
            raise ValueError(f"map {self.name}: key of {len(k)} bytes, expected {self.key_size}")
        return k

    def lookup(self, key) -> Optional[bytes]:
        """The value (for per-CPU maps: all CPUs' values concatenated), or None."""
        buf = ffi.new("char[]", self._slot * self.ncpus)
        ret = lib.bpf_map_lookup_elem(self.fd, self._key(key), buf)
        if ret == -errno.ENOENT:
            return None
        _check(ret, f"looking up a key in map {self.name}")
        return ffi.buffer(buf)[:]

    def lookup_percpu(self, key) -> list[bytes]:
        raw = self.lookup(key)
        if raw is None:
            return []
        return [raw[i * self._slot: i * self._slot + self.value_size] for i in range(self.ncpus)]

    def update(self, key, value, flags: int = 0) -> None:
        v = bytes(value)
        if self.percpu and len(v) == self.value_size:
            v = v.ljust(self._slot, b"\0") * self.ncpus
        _check(lib.bpf_map_update_elem(self.fd, self._key(key), v, flags),
               f"updating map {self.name}")

    def update_fd(self, key, fd: int) -> None:
        """Store a map or program fd (map-in-map, prog array, devmap by ifindex)."""
        self.update(key, ctypes.c_uint32(fd))

    def delete(self, key) -> bool:
        ret = lib.bpf_map_delete_elem(self.fd, self._key(key))
        if ret == -errno.ENOENT:
            return False
        _check(ret, f"deleting from map {self.name}")
        return True

    def keys(self) -> Iterator[bytes]:
        cur = ffi.NULL
        nxt = ffi.new("char[]", self.key_size)
        while True:
            ret = lib.bpf_map_get_next_key(self.fd, cur, nxt)
            if ret == -errno.ENOENT:
                return
            _check(ret, f"iterating map {self.name}")
            k = ffi.buffer(nxt)[:]
            yield k
            cur = ffi.new("char[]", k)

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        for k in self.keys():
            v = self.lookup(k)
            if v is not None:
                yield k, v

    def update_batch(self, keys: bytes, values: bytes, count: int, flags: int = 0) -> None:
        """Many elements in one syscall (arrays and hashes)."""
        if len(keys) != count * self.key_size or len(values) != count * self._slot * self.ncpus:
            raise ValueError(f"map {self.name}: batch of {count} has wrong buffer sizes")
        opts = ffi.new("struct bpf_map_batch_opts *")
        opts.sz = ffi.sizeof("struct bpf_map_batch_opts")
        opts.elem_flags = flags
        n = ffi.new("__u32 *", count)
        _check(lib.bpf_map_update_batch(self.fd, keys, values, n, opts),
               f"batch-updating {count} elements of map {self.name} ({n[0]} done)")

    def __enter__(self) -> "Map":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def create_map(map_type: int, name: str, key_size: int, value_size: int, max_entries: int,
               map_flags: int = 0) -> Map:
    opts = ffi.new("struct bpf_map_create_opts *")
    opts.sz = ffi.sizeof("struct bpf_map_create_opts")
    opts.map_flags = map_flags
    fd = lib.bpf_map_create(map_type, name.encode()[:15], key_size, value_size, max_entries, opts)
    if fd < 0:
        raise BpfError(f"creating map {name} ({max_entries} entries)", -fd)
    return Map(fd, name, map_type, key_size, value_size, max_entries, owns_fd=True)


@dataclass
class RunResult:
    retval: int
    data: bytes
    duration_ns: int

    @property
    def verdict(self) -> str:
        return VERDICTS.get(self.retval, str(self.retval))


def test_run(prog_fd: int, data: bytes, *, repeat: int = 1, flags: int = 0,
             ingress_ifindex: int = 0, batch_size: int = 0, out_size: int = 0) -> RunResult:
    """BPF_PROG_TEST_RUN on an XDP program. With BPF_F_TEST_XDP_LIVE_FRAMES the frames
    are really transmitted (XDP_TX leaves through `ingress_ifindex`), no data comes back."""
    opts = ffi.new("struct bpf_test_run_opts *")
    opts.sz = ffi.sizeof("struct bpf_test_run_opts")
    live = bool(flags & lib.BPF_F_TEST_XDP_LIVE_FRAMES)
    din = ffi.new("char[]", data)
    opts.data_in = din
    opts.data_size_in = len(data)
    dout = ffi.NULL
    if not live:
        size = out_size or len(data) + 256
        dout = ffi.new("char[]", size)
        opts.data_out = dout
        opts.data_size_out = size
    ctx = None
    if ingress_ifindex or live:
        ctx = ffi.new("__u32[6]")  # struct xdp_md: data, data_end, data_meta, ingress_ifindex, ...
        ctx[1] = len(data)  # the kernel checks data_end against the frame it builds
        ctx[3] = ingress_ifindex
        opts.ctx_in = ctx
        opts.ctx_size_in = 24
    opts.repeat = repeat
    opts.flags = flags
    opts.batch_size = batch_size
    ret = lib.bpf_prog_test_run_opts(prog_fd, opts)
    if ret < 0:
        raise BpfError("running BPF_PROG_TEST_RUN", -ret)
    out = b"" if live else ffi.buffer(dout, opts.data_size_out)[:]
    return RunResult(opts.retval, out, opts.duration)


test_run.__test__ = False  # not a pytest test when imported into a test module


def xdp_attach(ifindex: int, prog_fd: int, mode: str, old_prog_fd: int = -1) -> None:
    """Attach (or atomically replace old_prog_fd with) an XDP program."""
    flags = XDP_MODES[mode]
    opts = ffi.new("struct bpf_xdp_attach_opts *")
    opts.sz = ffi.sizeof("struct bpf_xdp_attach_opts")
    if old_prog_fd >= 0:
        flags |= lib.XDP_FLAGS_REPLACE
        opts.old_prog_fd = old_prog_fd
    _check(lib.bpf_xdp_attach(ifindex, prog_fd, flags, opts),
           f"attaching XDP program ({mode} mode) to ifindex {ifindex}")


def xdp_detach(ifindex: int, mode: str) -> None:
    opts = ffi.new("struct bpf_xdp_attach_opts *")
    opts.sz = ffi.sizeof("struct bpf_xdp_attach_opts")
    _check(lib.bpf_xdp_detach(ifindex, XDP_MODES[mode], opts),
           f"detaching XDP program from ifindex {ifindex}")


def xdp_query(ifindex: int) -> dict:
    """Attached program ids: {'drv': id, 'skb': id, 'mode': n} (0 = none)."""
    opts = ffi.new("struct bpf_xdp_query_opts *")
    opts.sz = ffi.sizeof("struct bpf_xdp_query_opts")
    _check(lib.bpf_xdp_query(ifindex, 0, opts), f"querying XDP on ifindex {ifindex}")
    return {"drv": opts.drv_prog_id, "skb": opts.skb_prog_id, "mode": opts.attach_mode,
            "prog_id": opts.prog_id}


def obj_pin(fd: int, path: str) -> None:
    _check(lib.bpf_obj_pin(fd, path.encode()), f"pinning to {path}")


class Skeleton:
    """One of our BPF objects through its generated skeleton: open, size maps, load.

    Use as a context manager; maps and programs are found by name.
    """

    def __init__(self, name: str):
        self.name = name
        self._fn = lambda op: getattr(lib, f"{name}_bpf__{op}")
        ptr = self._fn("open")()
        if ptr == ffi.NULL:
            raise BpfError(f"opening BPF object {name}", ffi.errno or errno.EINVAL)
        self._skel = ptr
        self._loaded = False

    @property
    def rodata(self):
        """The object's `const volatile` globals, as libbpf-bootstrap's skel->rodata: set
        them between open and load (after load they are mapped read-only)."""
        if self._loaded:
            raise RuntimeError(f"BPF object {self.name}: rodata is read-only once loaded")
        rodata = self._skel.rodata
        if rodata == ffi.NULL:
            raise BpfError(f"BPF object {self.name} has no rodata", errno.EINVAL)
        return rodata

    @property
    def obj(self):
        return self._skel.obj

    def _map(self, name: str):
        m = lib.bpf_object__find_map_by_name(self.obj, name.encode())
        if m == ffi.NULL:
            raise KeyError(f"BPF object {self.name} has no map {name}")
        return m

    def set_max_entries(self, name: str, n: int) -> None:
        _check(lib.bpf_map__set_max_entries(self._map(name), n),
               f"sizing map {name} to {n} entries")

    def set_inner_value_size(self, name: str, size: int) -> None:
        """The value size of the inner maps the map-of-maps `name` accepts."""
        inner = lib.bpf_map__inner_map(self._map(name))
        if inner == ffi.NULL:
            raise KeyError(f"BPF object {self.name}: map {name} has no inner map")
        _check(lib.bpf_map__set_value_size(inner, size),
               f"sizing the inner maps of {name} to {size}-byte values")

    def reuse_map_fd(self, name: str, fd: int) -> None:
        _check(lib.bpf_map__reuse_fd(self._map(name), fd), f"reusing pinned map {name}")

    def map_spec(self, name: str) -> dict:
        m = self._map(name)
        return {"type": lib.bpf_map__type(m), "key_size": lib.bpf_map__key_size(m),
                "value_size": lib.bpf_map__value_size(m),
                "max_entries": lib.bpf_map__max_entries(m), "map_flags": lib.bpf_map__map_flags(m)}

    def load(self) -> None:
        lib.xdplb_log_capture(1)
        try:
            ret = self._fn("load")(self._skel)
            log = ffi.string(lib.xdplb_log_text()).decode(errors="replace")
        finally:
            lib.xdplb_log_capture(0)
        if ret < 0:
            if -ret in (errno.EACCES, errno.EINVAL) and ("verifier" in log or "processed" in log
                                                         or -ret == errno.EACCES):
                raise VerifierError(f"BPF object {self.name}", -ret, log)
            raise BpfError(f"loading BPF object {self.name}: {log.strip()[-300:]}", -ret)
        self._loaded = True

    def map(self, name: str) -> Map:
        m = self._map(name)
        fd = lib.bpf_map__fd(m)
        if fd < 0:
            raise BpfError(f"map {name} of {self.name} has no fd (not loaded?)", -fd)
        return Map(fd, name, lib.bpf_map__type(m), lib.bpf_map__key_size(m),
                   lib.bpf_map__value_size(m), lib.bpf_map__max_entries(m))

    def prog_fd(self, name: str) -> int:
        p = lib.bpf_object__find_program_by_name(self.obj, name.encode())
        if p == ffi.NULL:
            raise KeyError(f"BPF object {self.name} has no program {name}")
        return _check(lib.bpf_program__fd(p), f"program {name} of {self.name} has no fd")

    def close(self) -> None:
        if self._skel is not None:
            self._fn("destroy")(self._skel)
            self._skel = None

    def __enter__(self) -> "Skeleton":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
