"""Per-stream state (Sans-I/O): session, segmenter, tag stabiliser."""

from __future__ import annotations

import numpy as np
import pytest

from rtagger.live.protocol import ProtocolError, Start
from rtagger.live.session import StreamSession
from rtagger.pipeline.session import Segmenter, SegmenterConfig, TagStabilizer


def _unit(v):
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


def test_segmenter_finds_a_change_after_confirmation():
    rng = np.random.default_rng(0)
    a, b = _unit(rng.standard_normal(16)), _unit(rng.standard_normal(16))
    seg = Segmenter(hop_s=1.0, cfg=SegmenterConfig(threshold=0.3, confirm=3, min_segment_s=10))
    out = [seg.update(a + 0.05 * rng.standard_normal(16)) for _ in range(20)]
    out += [seg.update(b + 0.05 * rng.standard_normal(16)) for _ in range(10)]
    assert out[:22] == [0] * 22
    assert out[22] == 3 and sum(out) == 3  # found at the third novel window, once


def test_segmenter_ignores_short_blips_and_young_segments():
    rng = np.random.default_rng(1)
    a, b = _unit(rng.standard_normal(8)), _unit(rng.standard_normal(8))
    seg = Segmenter(hop_s=1.0, cfg=SegmenterConfig(threshold=0.3, confirm=3, min_segment_s=10))
    seq = [a] * 12 + [b, b] + [a] * 5  # a 2-window break is not a new track
    assert sum(seg.update(e) for e in seq) == 0
    young = Segmenter(hop_s=1.0, cfg=SegmenterConfig(threshold=0.3, confirm=3,
                                                     min_segment_s=10))
    assert sum(young.update(e) for e in [a] * 5 + [b] * 5) == 0  # first track too short


def test_segmenter_compares_the_cls_embedding_without_the_profiles_after_it():
    rng = np.random.default_rng(2)
    a = _unit(rng.standard_normal(16))
    key_1, key_2 = np.eye(4)[0] * 3, np.eye(4)[2] * 3  # a key change inside one track
    seq = [np.concatenate([a, key_1])] * 20 + [np.concatenate([a, key_2])] * 10
    cfg = SegmenterConfig(threshold=0.3, confirm=3, min_segment_s=10)
    cls_only, whole = Segmenter(1.0, cfg, dims=16), Segmenter(1.0, cfg)
    assert sum(cls_only.update(e) for e in seq) == 0
    assert sum(whole.update(e) for e in seq) == 3  # the whole vector: a change


def test_stabilizer_hysteresis():
    st = TagStabilizer(1, on=0.5, off=0.3, dwell=2)
    seq = [0.6, 0.6, 0.45, 0.35, 0.2, 0.6, 0.2, 0.2, 0.7, 0.1, 0.1]
    got = [bool(st.update(np.array([p]))[0]) for p in seq]
    # on after 2 high; stays on above `off`; one low blip is not enough to release;
    # released after 2 consecutive lows; one high blip does not commit again
    assert got == [False, True, True, True, True, True, True, False, False, False, False]


def test_session_windows_from_int16_stereo_frames(debug_model):
    start = Start("int16", 32000, 2, hop_s=1.0, segment=False)
    s = StreamSession("t", start, debug_model.tags, None)
    frame = (np.zeros((32000, 2)) + 1000).astype("<i2").tobytes()  # 1 s of stereo
    windows = []
    for _ in range(5):
        windows += s.feed(frame)
    windows += s.finish()
    assert [w.start_s for w in windows] == [0.0, 1.0, 2.0]
    assert windows[-1].partial
    assert s.received_s == pytest.approx(5.0, abs=0.01)


def test_session_duration_limit(debug_model):
    s = StreamSession("t", Start(), debug_model.tags, None, max_duration_s=1.0)
    s.feed(np.zeros(16000, "<i2").tobytes())
    with pytest.raises(ProtocolError) as e:
        s.feed(np.zeros(100, "<i2").tobytes())
    assert e.value.code == "duration_limit"


def test_session_segment_event_restarts_the_track_context(debug_model):
    n = len(debug_model.tags)
    s = StreamSession("t", Start(hop_s=1.0), debug_model.tags, None)
    s.segmenter.cfg = SegmenterConfig(threshold=0.3, confirm=2, min_segment_s=5)
    from rtagger.audio.ringbuffer import Window

    rng = np.random.default_rng(0)
    a, b = _unit(rng.standard_normal(32)), _unit(rng.standard_normal(32))
    events = []
    for i in range(12):
        w = Window(i, i * 16000, np.zeros(59049, np.float32), 59049)
        emb, p = (a, np.zeros(n)) if i < 8 else (b, np.ones(n))
        events += s.add_window(w, p, emb)
    # window 8 is the first of the new track; the change is reported at its centre
    assert events == [{"type": "segment", "stream_id": "t", "segment": 1, "start_s": 9.845}]
    # the new segment's context holds only the new track's windows
    assert s.context.windows == 4
    np.testing.assert_allclose(s.context.mean_probs(), 1.0)
    msg = s.update_msg(w, np.ones(n), s.context.mean_probs(), 12.5)
    assert msg["segment"] == 1 and msg["seq"] == 1 and msg["latency_ms"] == 12.5


def test_a_segment_that_starts_on_an_outlier_is_not_stuck():
    """Silence first, then music: the music becomes the segment, and a later change is found."""
    rng = np.random.default_rng(2)
    silence, a, b = (_unit(rng.standard_normal(16)) for _ in range(3))
    cfg = SegmenterConfig(threshold=0.3, confirm=3, min_segment_s=10)
    seg = Segmenter(hop_s=1.0, cfg=cfg)
    out = [seg.update(silence)] + [seg.update(a + 0.05 * rng.standard_normal(16))
                                   for _ in range(30)]
    assert sum(out) == 0 and len(seg._recent) < cfg.confirm  # held windows stay bounded
    out = [seg.update(b + 0.05 * rng.standard_normal(16)) for _ in range(10)]
    assert out[2] == 3 and sum(out) == 3


def test_a_boundary_never_declares_more_windows_than_confirm():
    rng = np.random.default_rng(3)
    cfg = SegmenterConfig(threshold=0.3, confirm=80, min_segment_s=10)
    seg = Segmenter(hop_s=1.0, cfg=cfg)
    a, b = _unit(rng.standard_normal(16)), _unit(rng.standard_normal(16))
    out = [seg.update(a) for _ in range(20)] + [seg.update(b) for _ in range(100)]
    assert max(out) == 80 and out.index(80) == 20 + 79


def test_session_replays_every_window_of_a_long_confirmation(debug_model):
    """confirm > 64: the new segment gets all its windows (a 64-deep buffer once cut them)."""
    from rtagger.audio.ringbuffer import Window

    n = len(debug_model.tags)
    s = StreamSession("t", Start(hop_s=1.0), debug_model.tags, None)
    s.segmenter.cfg = SegmenterConfig(threshold=0.3, confirm=70, min_segment_s=5)
    rng = np.random.default_rng(0)
    a, b = _unit(rng.standard_normal(32)), _unit(rng.standard_normal(32))
    events = []
    for i in range(10 + 70):
        w = Window(i, i * 16000, np.zeros(59049, np.float32), 59049)
        emb, p = (a, np.zeros(n)) if i < 10 else (b, np.ones(n))
        events += s.add_window(w, p, emb)
    assert [e["segment"] for e in events] == [1] and s.context.windows == 70
    np.testing.assert_allclose(s.context.mean_probs(), 1.0)


def test_exclusive_tags_are_never_committed_together():
    from rtagger.model.vocab import exclusive_indices

    tags = ["rock", "major", "minor", "slow", "fast"]
    groups = exclusive_indices(tags)
    assert groups == [[3, 4], [1, 2]]
    st = TagStabilizer(len(tags), on=0.5, off=0.35, dwell=2, exclusive=groups)
    rng = np.random.default_rng(0)
    seen = []
    for step in range(60):
        # major and minor hover around 0.5 and swap the lead; slow/fast both high
        p = np.array([0.9, 0.5 + 0.05 * np.sin(step), 0.5 - 0.05 * np.sin(step),
                      0.8, 0.7]) + 0.01 * rng.standard_normal(5)
        c = st.update(p)
        assert not (c[1] and c[2]) and not (c[3] and c[4]), step
        seen.append(c.copy())
    seen = np.array(seen)
    assert seen[-1, 0] and seen[-1, 3] and not seen[-1, 4]  # the likelier of slow/fast
    assert seen[:, 1].any() or seen[:, 2].any()  # one mode tag is committed at times
    # a rival that takes the lead for good replaces the committed tag (never both)
    for _ in range(5):
        c = st.update(np.array([0.9, 0.1, 0.1, 0.1, 0.95]))
    assert c[4] and not c[3]
