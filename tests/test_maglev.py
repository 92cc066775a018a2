"""Maglev: the C build (lb/_native, what the programmer installs) makes the same table as
the readable Python reference, weights equal or not, and every backend gets its quota."""

from __future__ import annotations

import collections
import ipaddress
import random

import pytest

from lb import maglev
from lb.specs import backend_key

RNG = random.Random(7)
MIXES = {
    "equal": [1] * 5,
    "1-2-3": [1, 2, 3],
    "one-heavy": [1, 1, 1, 100],
    "two-to-one": [10, 5],
    "with-zero": [5, 0, 3, 7],
    "all-zero": [0, 0],
    "one-light": [3] * 7 + [1],
    "wide": [65535, 1, 2, 40000],
    "random-20": [RNG.randint(1, 50) for _ in range(20)],
    "random-60": [RNG.randint(0, 9) for _ in range(60)],  # more backends than M=13 slots
}
SIZES = (13, 251, 4099)


def holders(weights: list[int], v6: bool) -> list[maglev.Slotholder]:
    base = ipaddress.ip_address("fd00::100" if v6 else "10.2.0.1")
    return [maglev.Slotholder(backend_key(base + i), w) for i, w in enumerate(weights)]


@pytest.mark.parametrize("m", SIZES)
@pytest.mark.parametrize("mix", sorted(MIXES))
def test_c_build_equals_reference(mix: str, m: int):
    weights = MIXES[mix]
    hs = holders(weights, v6=m == 251)
    ids = [1000 + 3 * i for i in range(len(hs))]  # not the indexes: ids are passed through
    ref = maglev.build_reference(hs, m)
    got = maglev.build(hs, m, ids)
    assert len(got) == m
    assert list(got) == [ids[i] if i >= 0 else 0 for i in ref]
    # and the shares are the quotas (each within one slot of M * w / sum(w))
    per = collections.Counter(i for i in ref if i >= 0)
    assert [per[i] for i in range(len(hs))] == maglev.quotas(weights, m)
    if sum(weights):
        assert -1 not in ref


def test_c_build_equals_reference_full_size():
    weights = [RNG.randint(1, 8) for _ in range(100)]
    hs = holders(weights, v6=False)
    ids = list(range(1, 101))
    ref = maglev.build_reference(hs, 65537)
    assert list(maglev.build(hs, 65537, ids)) == [ids[i] for i in ref]
