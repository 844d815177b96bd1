"""Pseudo-labels: a teacher tags every window of the unlabelled pool with soft probabilities.

Output: ``shard-00000.npz`` files, each holding the windows of a fixed group of tracks
(track path, start sample, teacher probabilities as float16) and a ``meta`` JSON with the
teacher's weights checksum, tag list and hop. Shards are written atomically, so a killed
run resumes by skipping finished shards; shards made by another teacher are refused, not
mixed. Under ``torchrun`` each rank writes the shards ``k % world == rank``; any number of
hosts can share the work the same way.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rtagger.audio import SAMPLE_RATE
from rtagger.checkpoint import load_model
from rtagger.errors import ConfigError
from train.cache import FeatureCache
from train.loop import init_distributed
from train.manifest import Track
from train.progress import Bar
from train.windows import cached_only, song_windows

log = logging.getLogger(__name__)
TRACKS_PER_SHARD = 16
BATCH = 32


@dataclass
class PseudoReport:
    shards_total: int
    shards_written: int
    shards_skipped: int
    windows: int


def shard_path(out: Path, k: int) -> Path:
    return out / f"shard-{k:05d}.npz"


def _shard_meta(path: Path) -> dict | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return json.loads(str(z["meta"]))
    except (OSError, ValueError, KeyError) as e:
        log.warning("%s is unreadable (%s); it will be rewritten", path, e)
        return None


def pseudo_label(teacher: str | Path, tracks: list[Track], cache_dir: str | Path,
                 out_dir: str | Path, *, hop_s: float = 3.6905625, device: str | None = None,
                 progress: bool = True) -> PseudoReport:
    """Label all windows of ``tracks`` with ``teacher``; resumable and shardable."""
    info = init_distributed()
    dev = device or (f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu")
    model = load_model(teacher, device=dev)
    cache = FeatureCache(cache_dir)
    tracks = sorted(cached_only(tracks, cache, "unlabelled data"), key=lambda t: t.id)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hop = round(hop_s * SAMPLE_RATE)
    meta = {"teacher": str(teacher), "teacher_sha256": model.weights_sha256,
            "tags": model.tags, "hop_samples": hop}
    n_shards = (len(tracks) + TRACKS_PER_SHARD - 1) // TRACKS_PER_SHARD
    mine = [k for k in range(n_shards) if k % info.world == info.rank]
    written = skipped = windows = 0
    bar = Bar("pseudo-labelling shards", len(mine), enabled=progress and info.main)
    for k in mine:
        path = shard_path(out, k)
        if path.exists():
            old = _shard_meta(path)
            if old is not None and old["teacher_sha256"] != meta["teacher_sha256"]:
                raise ConfigError(f"{path} was made by another teacher "
                                  f"({old['teacher_sha256'][:12]}...); use a new folder")
            if old is not None:
                skipped += 1
                bar.advance()
                continue
        group = tracks[k * TRACKS_PER_SHARD : (k + 1) * TRACKS_PER_SHARD]
        refs, starts, probs = _label_group(model, cache, group, hop, dev)
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez(tmp, refs=np.array(refs), starts=np.array(starts, np.int64),
                 probs=probs.astype(np.float16), meta=json.dumps(meta))
        os.replace(tmp, path)
        written += 1
        windows += len(refs)
        bar.advance()
    bar.close()
    return PseudoReport(n_shards, written, skipped, windows)


@torch.no_grad()
def _label_group(model, cache: FeatureCache, group: list[Track], hop: int, dev: str):
    items = []
    for tr in group:
        length = round(cache.duration(tr) * SAMPLE_RATE)
        items += [(tr, s) for s in song_windows(length, 10**9, hop)]
    probs = []
    for b in range(0, len(items), BATCH):
        chunk = items[b : b + BATCH]
        waves = torch.from_numpy(np.stack([cache.window_pcm(t, s) for t, s in chunk])).to(dev)
        logits, _ = model.tagger(waves)
        probs.append(torch.sigmoid(logits).float().cpu().numpy())
    return ([t.path for t, _ in items], [s for _, s in items],
            np.concatenate(probs) if probs else np.zeros((0, len(model.tags)), np.float32))
