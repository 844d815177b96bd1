"""The tagging pipeline: streaming equals offline, aggregation, and the track context."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import pretend_tensorrt_fails

from rtagger.audio.decode import SAMPLE_RATE, load_audio
from rtagger.audio.signals import music_like
from rtagger.errors import ConfigError
from rtagger.pipeline.aggregate import TrackContext
from rtagger.pipeline.tagger import Tagger

# Window outputs of the same samples through different batch compositions: float32 matmul
# ordering differs with batch size, so allow 1e-5 (measured ~1e-7).
ATOL = 1e-5


@pytest.fixture(scope="module")
def tagger(debug_model):
    return Tagger(debug_model, hop_s=1.0, batch_size=4)


def _random_blocks(x: np.ndarray, seed: int):
    rng = np.random.default_rng(seed)
    pos = 0
    while pos < len(x):
        n = int(rng.choice([1, 7, 160, 1024, 4096, 16_000, 70_000]))
        yield x[pos : pos + n]
        pos += n


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streaming_in_random_blocks_equals_tag_file(tagger, encoded, seed):
    offline = tagger.tag_file(encoded["flac"])
    pcm = load_audio(encoded["flac"])
    updates = list(tagger.stream(_random_blocks(pcm, seed), low_latency=bool(seed % 2)))
    assert len(updates) == len(offline.windows) > 3
    for u, w in zip(updates, offline.windows, strict=True):
        assert (u.window.index, u.window.start_s, u.window.partial) == (w.index, w.start_s,
                                                                        w.partial)
        np.testing.assert_allclose(u.window.probs, w.probs, atol=ATOL)
        np.testing.assert_allclose(u.window.embedding, w.embedding, atol=ATOL)
    np.testing.assert_allclose(updates[-1].track_probs, offline.track_probs, atol=ATOL)


def test_stream_resamples_foreign_rates_like_the_decoder(tagger):
    x = music_like(6.0, sr=44_100)
    stereo = np.stack([x, x])
    cut = [stereo[:, i : i + 3000] for i in range(0, stereo.shape[1], 3000)]
    a = tagger.tag_blocks(cut, "cut", sample_rate=44_100, channels=2)
    b = tagger.tag_array(x, sample_rate=44_100)
    np.testing.assert_allclose(a.taggram(), b.taggram(), atol=ATOL)


def test_result_shapes_and_timestamps(tagger, song):
    r = tagger.tag_array(song)
    n_tags = len(r.tags)
    assert r.taggram().shape == (len(r.windows), n_tags)
    assert r.track_probs.shape == (n_tags,)
    assert [w.start_s for w in r.windows] == [float(i) for i in range(len(r.windows))]
    assert r.windows[-1].partial and r.duration_s == pytest.approx(len(song) / SAMPLE_RATE)
    assert ((r.track_probs >= 0) & (r.track_probs <= 1)).all()
    assert r.model["name"] == "untrained:debug" and r.model["trained"] is False


def test_mean_aggregation_weights_partial_windows(debug_model, song):
    t = Tagger(debug_model, aggregation="mean")
    r = t.tag_array(song)
    weights = np.array([(w.end_s - w.start_s) / (59_049 / SAMPLE_RATE) for w in r.windows])
    expected = (r.taggram() * weights[:, None]).sum(0) / weights.sum()
    np.testing.assert_allclose(r.track_probs, expected, atol=1e-6)
    assert r.aggregation == "mean"


def test_silence_and_empty_input(tagger):
    r = tagger.tag_array(np.zeros(0, np.float32))
    assert r.windows == [] and r.track_probs.shape == (len(r.tags),)
    r = tagger.tag_array(np.zeros(SAMPLE_RATE, np.float32))
    assert len(r.windows) == 1 and np.isfinite(r.track_probs).all()


def test_bad_settings_are_refused(debug_model):
    with pytest.raises(ConfigError, match="hop"):
        Tagger(debug_model, hop_s=10.0)
    with pytest.raises(ConfigError, match="batch_size"):
        Tagger(debug_model, batch_size=0)
    with pytest.raises(ConfigError, match="aggregation"):
        Tagger(debug_model, aggregation="max")


def test_track_context_spans_the_whole_segment_with_bounded_memory(debug_model):
    agg = debug_model.aggregator
    m = agg.cfg.max_windows
    ctx = TrackContext(len(debug_model.tags), agg)
    d = agg.cfg.d_in
    for i in range(10 * m):
        ctx.add(np.zeros(len(debug_model.tags)), np.full(d, float(i)), 1.0)
        assert len(ctx._embs) <= m
    kept = [int(e[0]) for e in ctx._embs]
    assert kept[0] == 0 and kept[-1] >= 8 * m  # evenly spread over all 10*m windows
    assert len(set(np.diff(kept))) == 1
    p = ctx.track_probs()
    assert p.shape == (len(debug_model.tags),)
    ctx.reset()
    assert ctx.windows == 0 and ctx._embs == []
    # the aggregator's output is what track_probs reports
    ctx.add(np.zeros(len(debug_model.tags)), np.ones(d), 1.0)
    with torch.no_grad():
        ref = torch.sigmoid(agg(torch.ones(1, 1, d)))[0].numpy()
    np.testing.assert_allclose(ctx.track_probs(), ref, atol=1e-6)


def test_context_indices_match_the_live_track_context(debug_model):
    from rtagger.pipeline.aggregate import context_indices

    agg = debug_model.aggregator
    m = agg.cfg.max_windows
    for n in (1, m, m + 1, 3 * m + 5):
        ctx = TrackContext(len(debug_model.tags), agg)
        for i in range(n):
            ctx.add(np.zeros(len(debug_model.tags)), np.full(agg.cfg.d_in, float(i)))
        assert [int(e[0]) for e in ctx._embs] == context_indices(n, m)


def test_a_tensorrt_fallback_is_reported_in_the_model_info(debug_model, song, monkeypatch,
                                                           tmp_path, caplog):
    pretend_tensorrt_fails(monkeypatch, RuntimeError("[TRT] out of memory"), tmp_path)
    with caplog.at_level("WARNING", logger="rtagger.engines"):
        t = Tagger(debug_model, engine="tensorrt", device="cpu")
    assert t.engine.name == "torch"
    r = t.tag_array(song)
    assert r.model["engine"] == "torch"
    assert "tensorrt failed to build" in r.model["engine_fallback"]
    assert "[TRT] out of memory" in r.model["engine_fallback"]
    assert "fell back to torch" in caplog.text
    # Without a fallback there is nothing to report.
    assert "engine_fallback" not in Tagger(debug_model).model_info()


def test_a_checkpoint_defaults_to_the_torch_engine(debug_model):
    assert Tagger(debug_model).engine.name == "torch"
