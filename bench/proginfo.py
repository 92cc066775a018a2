"""A loaded BPF program's JIT image, functions and source lines, for bench/profile.py.

From the kernel through libbpf (the library lb already links): BPF_OBJ_GET_INFO_BY_FD on
the program gives its jited image, the address and length of each function (the main
program and its subprograms, in func_info order), and two parallel arrays of line records:
line_info (file and source line as offsets into the program's BTF strings) and
jited_line_info (the address of each record's first instruction). The strings come from
the program's BTF, loaded from the kernel by id. objdump decodes the image (bpftool here
has no libbfd, so it cannot disassemble).
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Optional

from lb.errors import XdplbError


class ProfileError(XdplbError):
    """A profile cannot be taken; the message names the cause and the fix."""


class _ProgInfo(ctypes.Structure):
    """struct bpf_prog_info (linux/bpf.h) up to the fields read here; the kernel accepts
    a shorter struct than its own."""

    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
                ("tag", ctypes.c_uint8 * 8),
                ("jited_prog_len", ctypes.c_uint32), ("xlated_prog_len", ctypes.c_uint32),
                ("jited_prog_insns", ctypes.c_uint64), ("xlated_prog_insns", ctypes.c_uint64),
                ("load_time", ctypes.c_uint64), ("created_by_uid", ctypes.c_uint32),
                ("nr_map_ids", ctypes.c_uint32), ("map_ids", ctypes.c_uint64),
                ("name", ctypes.c_char * 16), ("ifindex", ctypes.c_uint32),
                ("gpl_compatible", ctypes.c_uint32),
                ("netns_dev", ctypes.c_uint64), ("netns_ino", ctypes.c_uint64),
                ("nr_jited_ksyms", ctypes.c_uint32), ("nr_jited_func_lens", ctypes.c_uint32),
                ("jited_ksyms", ctypes.c_uint64), ("jited_func_lens", ctypes.c_uint64),
                ("btf_id", ctypes.c_uint32), ("func_info_rec_size", ctypes.c_uint32),
                ("func_info", ctypes.c_uint64), ("nr_func_info", ctypes.c_uint32),
                ("nr_line_info", ctypes.c_uint32), ("line_info", ctypes.c_uint64),
                ("jited_line_info", ctypes.c_uint64), ("nr_jited_line_info", ctypes.c_uint32),
                ("line_info_rec_size", ctypes.c_uint32),
                ("jited_line_info_rec_size", ctypes.c_uint32)]


class _LineInfo(ctypes.Structure):  # struct bpf_line_info
    _fields_ = [("insn_off", ctypes.c_uint32), ("file_name_off", ctypes.c_uint32),
                ("line_off", ctypes.c_uint32), ("line_col", ctypes.c_uint32)]


class _FuncInfo(ctypes.Structure):  # struct bpf_func_info
    _fields_ = [("insn_off", ctypes.c_uint32), ("type_id", ctypes.c_uint32)]


def _libbpf() -> ctypes.CDLL:
    lib = ctypes.CDLL(ctypes.util.find_library("bpf") or "libbpf.so.1", use_errno=True)
    lib.bpf_obj_get_info_by_fd.argtypes = [ctypes.c_int, ctypes.c_void_p,
                                           ctypes.POINTER(ctypes.c_uint32)]
    lib.btf__load_from_kernel_by_id.restype = ctypes.c_void_p
    lib.btf__load_from_kernel_by_id.argtypes = [ctypes.c_uint32]
    lib.btf__name_by_offset.restype = ctypes.c_char_p
    lib.btf__name_by_offset.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.btf__type_by_id.restype = ctypes.POINTER(ctypes.c_uint32)  # name_off comes first
    lib.btf__type_by_id.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.btf__free.argtypes = [ctypes.c_void_p]
    return lib


@dataclass
class Insn:
    off: int      # from the function's start
    size: int
    text: str     # objdump's decoding (AT&T)


@dataclass
class Func:
    name: str
    addr: int
    code: bytes
    insns: list = field(default_factory=list)  # [Insn], sorted by off

    def insn_before(self, off: int) -> Optional[Insn]:
        """The instruction that ends at (or spans) `off`: a sampled IP is the instruction
        after the one the CPU was on. None at the function's first byte."""
        if off <= 0 or not self.insns:
            return None
        i = bisect.bisect_right([x.off for x in self.insns], off - 1) - 1
        return self.insns[i] if i >= 0 else None


@dataclass
class Line:
    addr: int     # jited address of the record's first instruction
    file: str     # as compiled, shortened to bpf/... when it is under a bpf/ directory
    line: int
    text: str     # the source line, from BTF

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def short_path(path: str) -> str:
    head, sep, tail = path.rpartition("bpf/")
    return f"bpf/{tail}" if sep else os.path.basename(path)


@dataclass
class ProgImage:
    id: int
    name: str
    tag: str
    funcs: list   # [Func], by address
    lines: list   # [Line], by address

    def __post_init__(self):
        self._starts = [f.addr for f in self.funcs]
        self._line_addrs = [ln.addr for ln in self.lines]

    def locate(self, ip: int) -> Optional[tuple]:
        """(Func, offset) of an address inside the program, else None."""
        i = bisect.bisect_right(self._starts, ip) - 1
        if i < 0:
            return None
        f = self.funcs[i]
        return (f, ip - f.addr) if ip < f.addr + len(f.code) else None

    def line_at(self, func: Func, addr: int) -> Optional[Line]:
        """The line record covering `addr`: the last one at or before it in its function."""
        i = bisect.bisect_right(self._line_addrs, addr) - 1
        if i >= 0 and self.lines[i].addr >= func.addr:
            return self.lines[i]
        return None

    def known_line_before(self, func: Func, addr: int) -> Optional[Line]:
        """The closest record before `addr` in its function with a real line (not 0)."""
        i = bisect.bisect_left(self._line_addrs, addr) - 1
        while i >= 0 and self.lines[i].addr >= func.addr:
            if self.lines[i].line:
                return self.lines[i]
            i -= 1
        return None


def _get_info(lib, fd: int, info: _ProgInfo, what: str) -> None:
    size = ctypes.c_uint32(ctypes.sizeof(info))
    if lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)) < 0:
        err = ctypes.get_errno()
        raise ProfileError(f"bench profile: reading {what} of program fd {fd}: "
                           f"{os.strerror(err)}; the program must still be loaded, and "
                           f"jited addresses need root (kernel.kptr_restrict)")


def read_prog(fd: int) -> ProgImage:
    """The jited image, functions and line records of loaded program `fd`."""
    lib = _libbpf()
    first = _ProgInfo()
    _get_info(lib, fd, first, "the info")
    if not first.jited_prog_len or not first.nr_jited_ksyms:
        raise ProfileError(f"bench profile: program {first.name.decode()} is not JIT "
                           f"compiled or its addresses are hidden: run as root with "
                           f"net.core.bpf_jit_enable=1")
    if not first.btf_id or not first.nr_line_info:
        raise ProfileError("bench profile: the program has no BTF line info: build the "
                           "BPF objects with clang -g (make build)")
    nfunc, nline = first.nr_jited_ksyms, first.nr_line_info
    image = ctypes.create_string_buffer(first.jited_prog_len)
    ksyms = (ctypes.c_uint64 * nfunc)()
    lens = (ctypes.c_uint32 * nfunc)()
    finfo = (_FuncInfo * first.nr_func_info)()
    linfo = (_LineInfo * nline)()
    jlines = (ctypes.c_uint64 * first.nr_jited_line_info)()
    info = _ProgInfo(jited_prog_len=first.jited_prog_len,
                     jited_prog_insns=ctypes.addressof(image),
                     nr_jited_ksyms=nfunc, jited_ksyms=ctypes.addressof(ksyms),
                     nr_jited_func_lens=nfunc, jited_func_lens=ctypes.addressof(lens),
                     func_info_rec_size=ctypes.sizeof(_FuncInfo),
                     nr_func_info=first.nr_func_info, func_info=ctypes.addressof(finfo),
                     nr_line_info=nline, line_info=ctypes.addressof(linfo),
                     line_info_rec_size=ctypes.sizeof(_LineInfo),
                     nr_jited_line_info=first.nr_jited_line_info,
                     jited_line_info=ctypes.addressof(jlines),
                     jited_line_info_rec_size=8)  # 0 here: EINVAL
    _get_info(lib, fd, info, "the jited image")
    btf = lib.btf__load_from_kernel_by_id(first.btf_id)
    if not btf:
        raise ProfileError(f"bench profile: loading BTF {first.btf_id} of the program: "
                           f"{os.strerror(ctypes.get_errno())}; run as root")
    try:
        def string(off: int) -> str:
            s = lib.btf__name_by_offset(btf, off)
            return s.decode(errors="replace") if s else ""

        names = []
        for k in range(nfunc):
            t = lib.btf__type_by_id(btf, finfo[k].type_id) if k < first.nr_func_info else None
            names.append(string(t[0]) if t else f"func{k}")
        lines = [Line(jlines[k], short_path(string(linfo[k].file_name_off)),
                      linfo[k].line_col >> 10, string(linfo[k].line_off).strip())
                 for k in range(min(nline, first.nr_jited_line_info))]
    finally:
        lib.btf__free(btf)
    funcs, pos = [], 0
    for k in range(nfunc):
        code = image.raw[pos:pos + lens[k]]
        pos += lens[k]
        funcs.append(Func(names[k], ksyms[k], code, disassemble(code, ksyms[k])))
    name_call_targets(funcs)
    funcs.sort(key=lambda f: f.addr)
    lines.sort(key=lambda ln: ln.addr)
    return ProgImage(info.id, first.name.decode(), bytes(first.tag).hex(), funcs, lines)


def disassemble(code: bytes, addr: int = 0) -> list:
    """objdump's decoding of x86-64 machine code loaded at `addr` -> [Insn] (offsets from
    its start; jump and call targets as absolute addresses)."""
    with tempfile.NamedTemporaryFile(prefix="xdplb-jit-") as f:
        f.write(code)
        f.flush()
        try:
            out = subprocess.run(["objdump", "-b", "binary", "-m", "i386:x86-64", "-D",
                                  "--no-show-raw-insn", f"--adjust-vma={addr:#x}", f.name],
                                 capture_output=True, text=True, check=True).stdout
        except FileNotFoundError:
            raise ProfileError("bench profile: objdump not found: install binutils "
                               "(make deps)") from None
        except subprocess.CalledProcessError as e:
            raise ProfileError(f"bench profile: objdump failed ({e.stderr.strip()[:80]}); "
                               f"it needs x86-64 support (binutils)") from None
    insns = []
    for row in out.splitlines():
        at, sep, text = row.partition(":\t")
        at = at.strip()
        if sep and at and all(c in "0123456789abcdef" for c in at):
            insns.append(Insn(int(at, 16) - addr, 0, " ".join(text.split())))
    for a, b in zip(insns, insns[1:]):
        a.size = b.off - a.off
    if insns:
        insns[-1].size = len(code) - insns[-1].off
    return insns


def name_call_targets(funcs: list) -> None:
    """`call 0xffff...` -> `call bpf_xdp_adjust_head` (kernel symbols, /proc/kallsyms)."""
    calls = {}
    for f in funcs:
        for insn in f.insns:
            op, _, target = insn.text.partition(" ")
            if op.startswith("call") and target.startswith("0x"):
                calls.setdefault(int(target.split()[0], 16), []).append(insn)
    if not calls:
        return
    try:
        with open("/proc/kallsyms") as syms:
            for row in syms:
                at, _, rest = row.partition(" ")
                insns = calls.get(int(at, 16))
                if insns:
                    name = rest.split()[1]
                    for insn in insns:
                        insn.text = f"call {name}"
    except (OSError, ValueError, IndexError):
        pass  # addresses stay as they are
