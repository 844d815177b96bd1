"""Model shapes, configs and size targets."""

from __future__ import annotations

import pytest
import torch

from rtagger.audio.decode import WINDOW_SAMPLES
from rtagger.errors import ConfigError
from rtagger.model.aggregator import AggregatorConfig, ContextAggregator, aggregator_config
from rtagger.model.cost import count_macs
from rtagger.model.network import (
    ChunkTagger,
    TaggerConfig,
    config_from_dict,
    config_to_dict,
    tagger_config,
)


def test_chunk_tagger_shapes():
    cfg = tagger_config("debug", n_tags=7)
    model = ChunkTagger(cfg).eval()
    logits, emb = model(torch.randn(3, WINDOW_SAMPLES))
    assert logits.shape == (3, 7)
    assert emb.shape == (3, cfg.d_model)
    assert cfg.tokens == 58 and cfg.bands_out == 16  # (2,2),(2,2),(2,1) pooling of 128x231


def test_paper_teacher_configuration():
    cfg = tagger_config("large", n_tags=50)
    assert (cfg.conv_channels, cfg.d_model, cfg.n_layers, cfg.n_heads) == (128, 256, 4, 8)
    assert cfg.pools == ((2, 2), (2, 2), (2, 1))
    assert cfg.ff_mult == 4 and cfg.dropout == 0.1


def test_student_is_at_most_a_tenth_of_the_teacher():
    wave = torch.zeros(1, WINDOW_SAMPLES)
    teacher = count_macs(ChunkTagger(tagger_config("large", 36)), wave)
    student = count_macs(ChunkTagger(tagger_config("small", 36)), wave)
    assert student <= teacher / 10


def test_config_round_trip_and_validation():
    cfg = tagger_config("small", 36, drop_path=0.1)
    assert config_from_dict(TaggerConfig, config_to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="no fields"):
        config_from_dict(TaggerConfig, {**config_to_dict(cfg), "bogus": 1})
    with pytest.raises(ConfigError, match="divisible"):
        TaggerConfig(n_tags=3, d_model=30, n_heads=4)
    with pytest.raises(ConfigError, match="unknown model size"):
        tagger_config("huge", 3)


def test_aggregator_ignores_padded_windows():
    torch.manual_seed(0)
    agg = ContextAggregator(aggregator_config("debug", 5, d_in=12)).eval()
    emb = torch.randn(1, 4, 12)
    padded = torch.cat([emb, torch.randn(1, 3, 12) * 100], dim=1)
    valid = torch.tensor([[True] * 4 + [False] * 3])
    with torch.no_grad():
        torch.testing.assert_close(agg(emb), agg(padded, valid), atol=1e-5, rtol=1e-5)


def test_aggregator_context_is_bounded():
    agg = ContextAggregator(AggregatorConfig(n_tags=2, d_in=4, d_model=8, n_layers=1,
                                             n_heads=2, max_windows=3))
    with pytest.raises(ConfigError, match="exceed"):
        agg(torch.zeros(1, 4, 4))


def test_drop_path_only_acts_in_training():
    torch.manual_seed(0)
    model = ChunkTagger(tagger_config("debug", 4, drop_path=0.5))
    x = torch.randn(2, WINDOW_SAMPLES)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], model(x)[0])


def test_cnn_only_baseline_mean_pools_the_tokens():
    cfg = tagger_config("debug", 5, n_layers=0, pooling="mean")
    logits, emb = ChunkTagger(cfg).eval()(torch.randn(2, WINDOW_SAMPLES))
    assert logits.shape == (2, 5) and emb.shape == (2, cfg.d_model)
    with pytest.raises(ConfigError, match="needs transformer layers"):
        tagger_config("debug", 5, n_layers=0)


def test_a_mean_skip_aggregator_starts_as_mean_pooled_window_logits():
    from rtagger.model.aggregator import aggregator_config

    tagger = ChunkTagger(tagger_config("debug", 5)).eval()
    agg = ContextAggregator(aggregator_config("debug", 5, tagger.cfg.d_model,
                                              mean_skip=True)).eval()
    agg.skip.load_state_dict(tagger.head.state_dict())
    emb = torch.randn(2, 6, tagger.cfg.d_model)
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, 4:] = False
    with torch.no_grad():
        out = agg(emb, valid)
        expected = torch.stack([tagger.head(emb[0]).mean(0), tagger.head(emb[1, :4]).mean(0)])
    torch.testing.assert_close(out, expected)


def test_sizes_are_named_by_size_and_old_role_names_say_so():
    from rtagger.errors import ConfigError
    from rtagger.model.network import SIZES

    assert list(SIZES) == ["large", "small", "tiny", "debug"]
    with pytest.raises(ConfigError, match="'student' is now called 'small'"):
        tagger_config("student", 36)
    with pytest.raises(ConfigError, match="unknown model size 'huge'"):
        tagger_config("huge", 36)


def test_a_chroma_profile_follows_the_embedding_and_changes_no_logit():
    from rtagger.model.network import with_window_features

    tagger = ChunkTagger(tagger_config("debug", 5)).eval()
    with_chroma = with_window_features(tagger).eval()
    wave = torch.randn(2, WINDOW_SAMPLES) * 0.1
    with torch.no_grad():
        logits, emb = tagger(wave)
        logits2, emb2 = with_chroma(wave)
    torch.testing.assert_close(logits, logits2)
    torch.testing.assert_close(emb, emb2[:, : tagger.cfg.d_model])
    assert emb2.shape[1] == with_chroma.cfg.embedding_dim == tagger.cfg.d_model + 12
    torch.testing.assert_close(emb2[:, -12:].sum(dim=1), torch.ones(2))
    with pytest.raises(ConfigError, match="chroma_bins"):
        tagger_config("debug", 5, chroma_bins=7)


def test_a_tempo_profile_comes_last_and_a_tagger_keeps_what_it_had():
    from rtagger.model.network import with_window_features

    tagger = ChunkTagger(tagger_config("debug", 5)).eval()
    both = with_window_features(with_window_features(tagger), chroma=False, tempo=True).eval()
    assert (both.cfg.chroma_bins, both.cfg.tempo_bins) == (12, 16)
    assert with_window_features(both, chroma=False, tempo=False) is both
    wave = torch.randn(2, WINDOW_SAMPLES) * 0.1
    with torch.no_grad():
        logits, emb = tagger(wave)
        logits2, emb2 = both(wave)
        tempo = both.tempo(both.mel(wave))
    torch.testing.assert_close(logits, logits2)
    assert emb2.shape[1] == both.cfg.embedding_dim == tagger.cfg.d_model + 12 + 16
    torch.testing.assert_close(emb2[:, : tagger.cfg.d_model], emb)
    torch.testing.assert_close(emb2[:, -16:], tempo)
    with pytest.raises(ConfigError, match="tempo_bins"):
        tagger_config("debug", 5, tempo_bins=8)


def test_the_aggregator_reads_a_tempo_change_as_a_shift_of_the_tempo_profile():
    torch.manual_seed(0)
    d = 32 + 12 + 16
    agg = ContextAggregator(aggregator_config("debug", 5, d, chroma_bins=12,
                                              tempo_bins=16)).eval()
    steady = torch.randn(1, 8, d)
    steady[..., -16:] = torch.softmax(torch.randn(16), 0)  # one tempo throughout
    changed = steady.clone()
    changed[0, 4:, -16:] = torch.roll(steady[0, 4:, -16:], 2, dims=-1)  # faster from window 4
    w = torch.ones(1, 8, 1)
    with torch.no_grad():
        _, a, _ = agg.window_inputs(steady, w)
        _, b, _ = agg.window_inputs(changed, w)
        agg(changed)
    assert agg.inp[0].normalized_shape == (a.shape[-1],) == (32 + 12 + 16 + 16 + 16,)
    torch.testing.assert_close(a[..., -32:-16], steady[..., -16:])  # the profile as it is
    assert float(a[..., -16:].abs().max()) < 1e-6  # no deviation from the context's mean
    deviation = b[0, :, -16:]
    torch.testing.assert_close(deviation[:4], -deviation[4:])  # flips sign at the change
    assert float(deviation.abs().max()) > 0.01


def test_split_score_finds_the_change_of_a_profile_and_ignores_padding_and_edges():
    from rtagger.model.aggregator import split_score

    slow, fast = torch.eye(4)[1], torch.eye(4)[3]
    steady = slow.repeat(10, 1)[None]
    changed = torch.cat([slow.repeat(5, 1), fast.repeat(5, 1)])[None]
    edge = torch.cat([slow.repeat(9, 1), fast[None]])[None]  # one odd last window
    w = torch.ones(1, 10, 1)
    assert float(split_score(steady, w)) == 0.0
    assert float(split_score(changed, w)) == pytest.approx(2.0)  # L1 of the two profiles
    # a split needs max(3, 20 %) windows a side: 7 / 3 at best, not 9 / 1 (which gives 2)
    assert float(split_score(edge, w)) == pytest.approx(2 / 3)
    padded = torch.cat([changed, torch.full((1, 6, 4), 9.0)], dim=1)  # 6 padded windows
    assert float(split_score(padded, torch.cat([w, torch.zeros(1, 6, 1)], dim=1))) == \
        pytest.approx(2.0)
    with pytest.raises(ConfigError, match="tempo_split needs"):
        ContextAggregator(aggregator_config("debug", 5, 32, tempo_split=True))


def test_an_aggregator_with_window_probs_reads_what_the_tagger_heard_in_each_window():
    torch.manual_seed(0)
    tagger = ChunkTagger(tagger_config("debug", 5)).eval()
    agg = ContextAggregator(aggregator_config("debug", 5, tagger.cfg.d_model,
                                              window_probs=True)).eval()
    agg.load_window_head(tagger.head)
    wave = torch.randn(3, WINDOW_SAMPLES) * 0.1
    with torch.no_grad():
        logits, emb = tagger(wave)
        _, window, _ = agg.window_inputs(emb[None], torch.ones(1, 3, 1))
    torch.testing.assert_close(window[0, :, -5:], torch.sigmoid(logits))
    assert not any(p.requires_grad for p in agg.window_head.parameters())  # stays the tagger's


def test_the_tonal_aggregator_does_not_depend_on_the_key():
    torch.manual_seed(0)
    d = 32 + 12
    agg = ContextAggregator(aggregator_config("debug", 5, d, chroma_bins=12,
                                              mean_skip=True)).eval()
    torch.nn.init.normal_(agg.tonal_head.weight)  # zero at start: make it count
    emb = torch.randn(2, 6, d)
    emb[..., -12:] = torch.rand(2, 6, 12)
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, 4:] = False
    transposed = emb.clone()
    transposed[..., -12:] = torch.roll(emb[..., -12:], 5, dims=-1)
    changed = emb.clone()
    changed[0, 3:, -12:] = torch.roll(emb[0, 3:, -12:], 2, dims=-1)  # a key change
    with torch.no_grad():
        out = agg(emb, valid)
        torch.testing.assert_close(agg(transposed, valid), out)
        assert not torch.allclose(agg(changed, valid)[0], out[0])
