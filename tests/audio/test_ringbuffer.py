"""Ring buffer and windower properties for arbitrary block sizes (hypothesis)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rtagger.audio.ringbuffer import RingBuffer, Windower, iter_windows
from rtagger.errors import ConfigError

W = 50  # small windows keep the property tests fast; the logic has no size constants


def reference_windows(x: np.ndarray, hop: int, window: int = W):
    """What the windower must produce: full windows, then one padded tail if needed."""
    out, start, covered = [], 0, 0
    while start + window <= len(x):
        out.append((start, x[start : start + window], window))
        covered = start + window
        start += hop
    if len(x) > covered:
        tail = x[start:]
        out.append((start, np.concatenate([tail, np.zeros(window - len(tail))]), len(tail)))
    return out


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 400), hop=st.integers(1, W),
       cuts=st.lists(st.integers(0, 400), max_size=30))
def test_any_block_sizes_give_the_reference_windows(n, hop, cuts):
    x = np.arange(1, n + 1, dtype=np.float32)
    edges = sorted({0, n, *(c for c in cuts if c < n)})
    blocks = [x[a:b] for a, b in itertools.pairwise(edges)]
    w = Windower(hop=hop, window=W)
    got = []
    for b in blocks:
        got.extend(w.push(b))
        assert w._ring.capacity == W  # memory stays bounded by one window
    got.extend(w.flush())
    ref = reference_windows(x, hop)
    assert [g.start for g in got] == [r[0] for r in ref]
    assert [g.index for g in got] == list(range(len(ref)))
    for g, (_, samples, valid) in zip(got, ref, strict=True):
        np.testing.assert_array_equal(g.samples, samples)
        assert g.valid == valid and g.partial == (valid < W)


def test_one_huge_block_equals_many_small_ones():
    x = np.random.default_rng(0).standard_normal(10_000).astype(np.float32)
    big = list(iter_windows([x], hop=7))
    small = list(iter_windows(np.array_split(x, 997), hop=7))
    assert len(big) == len(small)
    for a, b in zip(big, small, strict=True):
        np.testing.assert_array_equal(a.samples, b.samples)


def test_timestamps_are_in_seconds_of_audio():
    w = Windower(hop=16_000)
    wins = w.push(np.zeros(16_000 * 5, np.float32)) + w.flush()
    # full windows at 0 s and 1 s; samples after 4.69 s are only covered by a padded one
    assert [round(x.start_s, 3) for x in wins] == [0.0, 1.0, 2.0]
    assert wins[0].end_s == pytest.approx(3.6905625)
    assert [x.partial for x in wins] == [False, False, True]
    assert wins[-1].end_s == pytest.approx(5.0) and wins[-1].valid == 48_000


def test_short_stream_gives_one_partial_window_and_empty_stream_none():
    w = Windower()
    assert w.push(np.ones(100, np.float32)) == []
    (only,) = w.flush()
    assert only.partial and only.valid == 100 and only.samples[100:].sum() == 0
    assert Windower().flush() == []


def test_push_after_flush_and_reset():
    w = Windower(hop=W, window=W)
    w.flush()
    with pytest.raises(RuntimeError, match="reset"):
        w.push(np.zeros(3, np.float32))
    w.reset()
    assert len(w.push(np.zeros(W, np.float32))) == 1


@pytest.mark.parametrize("hop", [0, -1, W + 1])
def test_invalid_hop(hop):
    with pytest.raises(ConfigError, match="hop"):
        Windower(hop=hop, window=W)


def test_ring_refuses_reads_of_overwritten_samples():
    r = RingBuffer(4)
    r.write(np.arange(3, dtype=np.float32))
    r.write(np.arange(3, 6, dtype=np.float32))
    np.testing.assert_array_equal(r.read(2, 4), [2, 3, 4, 5])
    with pytest.raises(ValueError, match="not in the ring"):
        r.read(0, 2)
