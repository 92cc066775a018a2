"""Build the BPF objects, their skeletons, and the cffi extension `lb._native`.

clang compiles bpf/*.bpf.c (-g -O2 -target bpf), `bpftool gen skeleton` embeds each object
in a header, and cffi's API mode compiles one extension from csrc/ (log capture, Maglev,
the data path's hash from bpf/flowhash.h) that includes the skeletons and links libbpf
dynamically. Python never parses ELF: it opens, sizes, loads and attaches through the
skeleton and libbpf, and finds maps and programs by name.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

from cffi import FFI

ROOT = pathlib.Path(__file__).resolve().parent
BPF_DIR = ROOT / "bpf"
OUT_DIR = ROOT / "build" / "bpf"
CSRC_DIR = ROOT / "csrc"
# The extension's own C (csrc/native.cdef declares what Python sees of it).
CSRC = ("log.c", "maglev.c", "flowhash.c")
# Every BPF object and the skeleton name it gets (functions `<name>__open` etc.).
OBJECTS = {"lb": "lb_bpf", "decap": "decap_bpf", "bench": "bench_bpf"}


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, check=True, **kw)
    except FileNotFoundError:
        sys.exit(f"build_ffi: {cmd[0]} not found (install clang, llvm and bpftool: make deps)")
    except subprocess.CalledProcessError as e:
        sys.exit(f"build_ffi: {' '.join(cmd)} failed with exit code {e.returncode}")


def _arch_include() -> str:
    try:
        triple = subprocess.run(["gcc", "-dumpmachine"], check=True, capture_output=True,
                                text=True).stdout.strip()
    except (FileNotFoundError, subprocess.CalledProcessError):
        triple = f"{os.uname().machine}-linux-gnu"
    return f"/usr/include/{triple}"


def build_bpf() -> None:
    """bpf/NAME.bpf.c -> build/bpf/NAME.bpf.o -> build/bpf/NAME.skel.h."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    clang = os.environ.get("CLANG", "clang")
    bpftool = os.environ.get("BPFTOOL") or shutil.which("bpftool") or "/usr/sbin/bpftool"
    for src_name, skel_name in OBJECTS.items():
        src = BPF_DIR / f"{src_name}.bpf.c"
        obj = OUT_DIR / f"{src_name}.bpf.o"
        _run([clang, "-g", "-O2", "-target", "bpf", "-mcpu=v3", "-Wall", "-Werror",
              f"-I{_arch_include()}", f"-I{BPF_DIR}", "-c", str(src), "-o", str(obj)])
        skel = _run([bpftool, "gen", "skeleton", str(obj), "name", skel_name],
                    capture_output=True).stdout
        (OUT_DIR / f"{src_name}.skel.h").write_bytes(skel)


ffibuilder = FFI()
ffibuilder.cdef((CSRC_DIR / "native.cdef").read_text())
build_bpf()
ffibuilder.set_source(
    "lb._native",
    '#include "module.h"',
    sources=[str((CSRC_DIR / name).relative_to(ROOT)) for name in CSRC],
    include_dirs=[str(CSRC_DIR), str(OUT_DIR), str(BPF_DIR)],
    libraries=["bpf", "elf", "z"],
    extra_compile_args=["-O2", "-Wall", "-Wno-unused-function"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=False)
