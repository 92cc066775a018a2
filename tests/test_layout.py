"""lb/layout.py mirrors bpf/lb_structs.h: compared with the BTF of the built objects (size,
member names and order, offsets, member sizes, array lengths), plus the enums and flag
constants that BTF does not carry, compared with the headers' text."""

from __future__ import annotations

import ctypes
import functools
import json
import pathlib
import re
import subprocess

import pytest

from lb import flowhash
from lb import layout

ROOT = pathlib.Path(__file__).resolve().parent.parent
BPFTOOL = "/usr/sbin/bpftool"
LB_OBJ = ROOT / "build" / "bpf" / "lb.bpf.o"
BENCH_OBJ = ROOT / "build" / "bpf" / "bench.bpf.o"
STRUCTS_H = ROOT / "bpf" / "lb_structs.h"
CONSTS_H = ROOT / "bpf" / "lb_consts.h"


@functools.lru_cache(maxsize=None)
def btf(obj: pathlib.Path) -> dict:
    out = subprocess.run([BPFTOOL, "btf", "dump", "file", str(obj), "format", "raw", "-j"],
                         check=True, capture_output=True, text=True).stdout
    return {t["id"]: t for t in json.loads(out)["types"]}


def resolve(types: dict, tid: int) -> dict:
    t = types[tid]
    while t["kind"] in ("TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG"):
        t = types[t["type_id"]]
    return t


def type_size(types: dict, tid: int) -> int:
    t = resolve(types, tid)
    if t["kind"] == "ARRAY":
        return t["nr_elems"] * type_size(types, t["type_id"])
    return t["size"]


def btf_struct(obj: pathlib.Path, name: str) -> tuple[dict, dict]:
    types = btf(obj)
    found = [t for t in types.values() if t["kind"] == "STRUCT" and t["name"] == name]
    assert len(found) == 1, f"struct {name}: {len(found)} definitions in {obj.name}'s BTF"
    return types, found[0]


def compare(obj: pathlib.Path, name: str, cls) -> None:
    types, st = btf_struct(obj, name)
    assert ctypes.sizeof(cls) == st["size"], f"{name}: size {ctypes.sizeof(cls)} != {st['size']}"
    names = [f[0] for f in cls._fields_]
    assert names == [m["name"] for m in st["members"]], f"{name}: member names/order"
    for (fname, ftype), m in zip(cls._fields_, st["members"]):
        where = f"{name}.{fname}"
        assert m["bits_offset"] % 8 == 0, f"{where}: bit-field"
        assert getattr(cls, fname).offset == m["bits_offset"] // 8, f"{where}: offset"
        assert ctypes.sizeof(ftype) == type_size(types, m["type_id"]), f"{where}: size"
        t = resolve(types, m["type_id"])
        if t["kind"] == "ARRAY":
            assert issubclass(ftype, ctypes.Array), f"{where}: BTF array, ctypes scalar"
            assert ftype._length_ == t["nr_elems"], f"{where}: array length"
            assert ctypes.sizeof(ftype._type_) == type_size(types, t["type_id"]), where
            t = resolve(types, t["type_id"])
            ftype = ftype._type_
        else:
            assert not issubclass(ftype, ctypes.Array), f"{where}: ctypes array, BTF scalar"
        if t["kind"] == "INT":
            # every mirror field is unsigned, like the header's __uN
            assert t["encoding"] != "SIGNED", f"{where}: signed in C"
            assert ftype(-1).value > 0, f"{where}: signed in ctypes"


@pytest.mark.parametrize("name", sorted(layout.MIRRORS))
def test_mirror_matches_btf(name):
    compare(LB_OBJ, name, layout.MIRRORS[name])


def test_bench_template_matches_btf():
    compare(BENCH_OBJ, "bench_tmpl", layout.BenchTemplate)


def test_every_shared_struct_is_mirrored():
    declared = set(re.findall(r"^struct (\w+) \{", STRUCTS_H.read_text(), re.M))
    assert declared == set(layout.MIRRORS), (declared ^ set(layout.MIRRORS))


def test_compare_detects_a_wrong_mirror():
    """The comparison itself is strict: a mirror with one field moved fails."""
    class Bad(layout._S):
        _fields_ = [("vip_id", layout.u32), ("ring_size", layout.u32), ("flags", layout.u32),
                    ("pad", layout.u32)]

    class Short(layout._S):
        _fields_ = [("addr", layout.u32 * 3), ("port", layout.u16), ("proto", layout.u8), ("family", layout.u8)]

    with pytest.raises(AssertionError):
        compare(LB_OBJ, "vip_meta", Bad)
    with pytest.raises(AssertionError):
        compare(LB_OBJ, "vip_key", Short)


def _c_enum(text: str, name: str) -> dict[str, int]:
    body = re.search(r"enum %s \{(.*?)\};" % name, text, re.S).group(1)
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
    out, nxt = {}, 0
    for item in (i.strip() for i in body.split(",")):
        if not item:
            continue
        if "=" in item:
            k, v = (x.strip() for x in item.split("="))
            nxt = int(v, 0)
        else:
            k = item
        out[k] = nxt
        nxt += 1
    return out


def _c_define(text: str, name: str) -> int:
    m = re.search(r"^#define %s\s+\(?([0-9xXa-fA-F]+)u?(?:\s*<<\s*(\d+))?\)?" % name, text, re.M)
    assert m, name
    v = int(m.group(1).rstrip("uU"), 0)
    return v << int(m.group(2)) if m.group(2) else v


def test_stat_enum_matches_header():
    c = _c_enum(STRUCTS_H.read_text(), "lb_stat")
    want = {k[3:]: v for k, v in c.items() if k != "ST__MAX"}
    assert {s.name: s.value for s in layout.Stat} == want
    assert c["ST__MAX"] <= layout.GLOBAL_SLOTS == _c_define(STRUCTS_H.read_text(), "LB_GLOBAL_SLOTS")


def test_other_enums_and_flags_match_header():
    text = STRUCTS_H.read_text()
    fam = _c_enum(text, "lb_family")
    assert (fam["LB_AF_NONE"], fam["LB_AF_INET"], fam["LB_AF_INET6"]) == (
        layout.AF_NONE, layout.AF_INET, layout.AF_INET6)
    enc = _c_enum(text, "lb_encap")
    assert (enc["LB_ENCAP_IPIP"], enc["LB_ENCAP_GUE"]) == (layout.ENCAP_IPIP, layout.ENCAP_GUE)
    tx = _c_enum(text, "lb_tx_mode")
    assert (tx["LB_TX_XDP_TX"], tx["LB_TX_REDIRECT"]) == (layout.TX_XDP_TX, layout.TX_REDIRECT)
    assert _c_define(text, "VIP_F_HASH_SRC_ONLY") == layout.VIP_F_HASH_SRC_ONLY
    assert _c_define(text, "VIP_F_QUIC") == layout.VIP_F_QUIC
    assert _c_define(text, "BE_F_FLOWS_STAY") == layout.BE_F_FLOWS_STAY
    consts = CONSTS_H.read_text()
    assert _c_define(consts, "FLOW_HASH_SEED") == flowhash.FLOW_HASH_SEED
    assert _c_define(consts, "PREFILTER_MULT") == flowhash.PREFILTER_MULT
    assert _c_define(consts, "LB_PREFILTER_WORDS") == layout.PREFILTER_WORDS
    assert _c_define(consts, "LB_QUIC_FILTER_WORDS") == layout.QUIC_FILTER_WORDS
    assert _c_define(consts, "LB_QUIC_CACHE_SLOTS") == layout.QUIC_CACHE_SLOTS
    assert _c_define(consts, "LB_RING_CHUNK") == layout.RING_CHUNK
    assert _c_define(consts, "LB_RING_CHUNK16") == layout.RING_CHUNK16


def test_objects_are_current():
    """BTF of a stale object would make the comparisons above meaningless."""
    srcs = list((ROOT / "bpf").glob("*.h")) + [ROOT / "bpf" / "lb.bpf.c"]
    newest = max(p.stat().st_mtime for p in srcs)
    assert LB_OBJ.stat().st_mtime >= newest, "build/bpf/lb.bpf.o is older than bpf/: rebuild"
