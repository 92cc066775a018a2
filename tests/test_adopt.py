"""Pins of the wrong shape left in the pin directory: each is replaced (and reported in
Datapath.replaced, which the daemon logs as pinned_map_replaced) before anything uses it,
instead of failing start-up, attaching and then failing, or breaking `stats` later."""

from __future__ import annotations

import array
import ipaddress
import os
import subprocess

import pytest

from lb.datapath import Datapath, Limits, MAP_NAMES
from lb.native import Map, lib

PIN = "/sys/fs/bpf/xdplb-adopt-test"
VIP = ipaddress.ip_address("192.0.2.10")
LIMITS = Limits(max_vips=64, max_backends=256, flow_table_size=1024)


def _clean() -> None:
    if os.path.isdir(PIN):
        for name in os.listdir(PIN):
            path = os.path.join(PIN, name)
            (os.rmdir if os.path.isdir(path) else os.unlink)(path)
        os.rmdir(PIN)


@pytest.fixture
def pin():
    _clean()
    yield PIN
    _clean()


def test_prog_pin_that_is_a_directory_is_replaced_before_attaching(pin):
    os.makedirs(f"{pin}/prog")
    with Datapath(LIMITS, pin_dir=pin) as dp:
        assert "prog" in dp.replaced and "directory" in dp.replaced["prog"]
        dp.pin_program()
        assert os.path.isfile(f"{pin}/prog")
        dp.unpin_all()
    assert not os.path.exists(pin)


# an older xdplb's rings (one u32 id per element) must be replaced, never misread
OLD_XDPLB_INNER = ["value", "4", "entries", "65537", "flags",
                   str(lib.BPF_F_INNER_MAP | lib.BPF_F_MMAPABLE)]


@pytest.mark.parametrize("inner", [["value", "8", "entries", "1"], OLD_XDPLB_INNER],
                         ids=["foreign", "older-xdplb-u32"])
def test_rings_with_another_inner_layout_is_replaced(pin, inner):
    os.makedirs(pin, mode=0o700)
    for args in (["inner", "type", "array", "key", "4", *inner, "name", "foreign"],
                 ["rings", "type", "array_of_maps", "key", "4", "value", "4", "entries",
                  str(2 * LIMITS.max_vips), "name", "rings", "inner_map", "pinned",
                  f"{pin}/inner"]):
        subprocess.run(["bpftool", "map", "create", f"{pin}/{args[0]}", *args[1:]],
                       check=True, capture_output=True)
    os.unlink(f"{pin}/inner")
    with Datapath(LIMITS, pin_dir=pin) as dp:
        assert "inner" in dp.replaced.get("rings", ""), dp.replaced
        assert "rings" not in dp.adopted
        ring = array.array("I", [1, 2, 3] * 34 + [1])
        dp.install_rings([(1, ring)])  # refused by a foreign inner layout
        assert dp.read_ring(1) == ring
        dp.unpin_all()


# 16-bit rings (lb.max_backends <= 65536) and 32-bit ones (above): a restart across the
# line must rebuild the rings, never read one width as the other
WIDE = Limits(max_vips=64, max_backends=70000, flow_table_size=1024)


@pytest.mark.parametrize("first,then,bits", [(LIMITS, WIDE, 16), (WIDE, LIMITS, 32)],
                         ids=["16-then-32", "32-then-16"])
def test_rings_of_the_other_id_width_is_replaced(pin, first, then, bits):
    ring = array.array("I", [1, 2, 3] * 34 + [255])
    with Datapath(first, pin_dir=pin) as dp:
        dp.install_rings([(3, ring)])
        dp.set_vip(VIP, 80, 6, vip_id=5, ring_id=3, ring_size=len(ring))
    with Datapath(then, pin_dir=pin) as dp:
        why = dp.replaced.get("rings", "")
        assert f"rings hold {bits}-bit backend ids" in why and "lb.max_backends" in why, \
            dp.replaced
        assert "rings" not in dp.adopted and dp.read_ring(3) is None
        dp.install_rings([(3, ring)])
        assert dp.read_ring(3) == ring
    with Datapath(then, pin_dir=pin) as dp:  # the same width again: adopted
        assert "rings" in dp.adopted and dp.read_ring(3) == ring
        dp.unpin_all()


@pytest.mark.parametrize("vip_id,ring_id", [(99999, 1), (1, 99999), (0, 1)])
def test_vips_with_ids_out_of_range_is_replaced(pin, vip_id, ring_id):
    with Datapath(LIMITS, pin_dir=pin) as dp:
        dp.set_vip(VIP, 80, 6, vip_id=vip_id, ring_id=ring_id, ring_size=101)
    with Datapath(LIMITS, pin_dir=pin) as dp:
        assert "vips" in dp.replaced and "vips" not in dp.adopted, dp.replaced
        # the index copies `vips`: it goes with it (test_vipindex shows why)
        assert dp.replaced["vip_index"] == "vips not adopted"
        assert set(MAP_NAMES) - set(dp.adopted) == {"vips", "vip_index"}
        with Map.from_pin(f"{pin}/vips") as m:
            assert list(m.keys()) == []
        dp.unpin_all()


def test_fitting_pins_are_adopted(pin):
    with Datapath(LIMITS, pin_dir=pin) as dp:
        ring = array.array("I", [1] * 101)
        dp.install_rings([(3, ring)])
        dp.set_vip(VIP, 80, 6, vip_id=5, ring_id=3, ring_size=101)
        dp.pin_program()
    with Datapath(LIMITS, pin_dir=pin) as dp:
        assert dp.replaced == {} and sorted(dp.adopted) == sorted(MAP_NAMES)
        assert dp.read_ring(3) == ring
        dp.unpin_all()
    assert not os.path.exists(pin)
