"""Score a checkpoint on a labelled manifest: window level and song level, mean vs aggregator.

Inference goes through :class:`rtagger.pipeline.tagger.Tagger`, the same path users run, on audio
from the feature cache. Window labels come from the synthetic benchmark's timeline when a track
has one (:func:`rtagger.train.synth.labels.window_labels`); otherwise a window takes its song's tags
(the multiple-instance assumption). Song scores are computed twice from the same windows:
mean pooling (the paper's aggregation) and the model's context aggregator, fed exactly as
the live track context would feed it.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np

from rtagger.atomic import atomic_write
from rtagger.audio.decode import SAMPLE_RATE, WINDOW_S
from rtagger.model.checkpoint import load_model
from rtagger.pipeline.aggregate import TrackContext
from rtagger.pipeline.tagger import Tagger
from rtagger.train.data.cache import FeatureCache
from rtagger.train.data.manifest import Track
from rtagger.train.data.windows import cached_only, multi_hot
from rtagger.train.evaluation.evaluate import evaluate_levels, write_report
from rtagger.train.progress import Bar

log = logging.getLogger(__name__)


def _window_truth(track: Track, start_s: float, end_s: float) -> set[str]:
    timeline = track.extra.get("timeline")
    if timeline is None:
        return set(track.tags)
    from rtagger.train.synth.labels import window_labels

    return window_labels({"tags": list(track.tags), "timeline": timeline}, start_s, end_s)


def score(model_path: str | Path, tracks: list[Track], cache_dir: str | Path, *,
          hop_s: float = WINDOW_S, device: str = "cpu", progress: bool = True) -> dict:
    """Metrics dict keyed by level (``window``, ``song/mean``, ``song/aggregator``)."""
    model = load_model(model_path, device=device)
    tagger = Tagger(model, device=device, hop_s=hop_s, aggregation="mean", batch_size=32)
    cache = FeatureCache(cache_dir)
    tracks = cached_only(tracks, cache, "evaluation data")
    tags = model.tags
    index = {t: i for i, t in enumerate(tags)}
    win_true, win_score, song_mean, song_agg = [], [], [], []
    bar = Bar("scoring songs", len(tracks), enabled=progress)
    for tr in tracks:
        pcm = cache.pcm(tr).astype(np.float32) / 32768.0
        result = tagger.tag_array(pcm, source=tr.id)
        for w in result.windows:
            if w.partial and w.end_s - w.start_s < 0.5 * WINDOW_S:
                continue  # mostly padding: not a fair window-level example
            y = np.zeros(len(tags), np.float32)
            for t in _window_truth(tr, w.start_s, w.end_s):
                if t in index:
                    y[index[t]] = 1.0
            win_true.append(y)
            win_score.append(w.probs)
        song_mean.append(result.track_probs)
        if model.aggregator is not None:
            ctx = TrackContext(len(tags), model.aggregator)
            for w in result.windows:
                ctx.add(w.probs, w.embedding, (w.end_s - w.start_s) / WINDOW_S)
            song_agg.append(ctx.track_probs())
        bar.advance()
    bar.close()
    song_scores = {"mean": np.stack(song_mean)}
    if song_agg:
        song_scores["aggregator"] = np.stack(song_agg)
    song_true = multi_hot(tracks, tags)
    results = evaluate_levels(np.stack(win_true), np.stack(win_score), song_true,
                              song_scores, tags,
                              {t: model.tag_groups.get(t, "") for t in tags})
    results["_songs"] = {"ids": [t.id for t in tracks], "tags": list(tags),
                         "true": song_true, **song_scores}
    results["_meta"] = {"model": (str(Path(model_path).resolve()) if Path(model_path).exists()
                                  else str(model_path)), "model_name": model.name,
                        "weights_sha256": model.weights_sha256, "songs": len(tracks),
                        "windows": len(win_true), "hop_s": hop_s,
                        "audio_hours": sum(cache.duration(t) for t in tracks) / 3600,
                        "sample_rate": SAMPLE_RATE}
    return results


def score_and_report(model_path: str | Path, tracks: list[Track], cache_dir: str | Path,
                     out_dir: str | Path, *, title: str = "", **kw) -> list[Path]:
    """Score and write the report, plus ``meta.json`` (model, data) and ``songs.npz``
    (song ids, truth and song-level scores per aggregation, for paired comparisons)."""
    import json

    results = score(model_path, tracks, cache_dir, **kw)
    meta = results.pop("_meta")
    songs = results.pop("_songs")
    out = Path(out_dir)
    paths = write_report(results, out, title or f"{meta['model_name']} ({meta['songs']} "
                                                f"songs, {meta['windows']} windows)")
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in songs.items()})
    paths.append(atomic_write(out / "songs.npz", buf.getvalue()))
    paths.append(atomic_write(out / "meta.json", json.dumps(meta, indent=1).encode()))
    return paths
