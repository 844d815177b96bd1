"""Pseudo-labels: a teacher tags every window of the unlabelled pool with soft probabilities.

Output: ``shard-00000.npz`` files, each holding the windows of a fixed group of tracks
(track path, start sample, teacher probabilities as float16, NaN where an ensemble has no
label for a tag) and a ``meta`` JSON recording
everything its content depends on: the teacher's weights checksum, tag list, hop and window
length, and the shard's tracks (id, path and cached audio content key) with their digest.
Shards are written atomically, so a killed run resumes by skipping finished shards. On
resume a shard is checked against that record:

- another teacher, tag list, hop or window length is **refused** (:class:`ConfigError`):
  those are settings of the whole folder, and a student must not mix two teachers or two
  hops in one set of labels; use a new folder (or delete this one);
- other tracks (the pool changed, a track's audio changed, or a shard written by an older
  rtagger that did not record them) are **rewritten**, with the reason logged; shards past
  the new shard count are removed, also logged.

Under ``torchrun`` each rank writes the shards ``k % world == rank``; any number of hosts
can share the work the same way.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from rtagger.atomic import atomic_write
from rtagger.audio.decode import SAMPLE_RATE, WINDOW_S, WINDOW_SAMPLES
from rtagger.errors import ConfigError
from rtagger.model.checkpoint import load_model
from rtagger.train.data.cache import FeatureCache
from rtagger.train.data.manifest import Track
from rtagger.train.data.windows import cached_only, song_windows
from rtagger.train.fit.loop import init_distributed
from rtagger.train.progress import Bar

log = logging.getLogger(__name__)
TRACKS_PER_SHARD = 16
BATCH = 32
SHARD_FORMAT = 2  # 2: the meta records the shard's tracks and the window length
# Settings every shard of one folder shares; a shard that differs in one is refused.
FOLDER_KEYS = ("teacher_sha256", "tags", "hop_samples", "window_samples")
_SHARD_NAME = re.compile(r"shard-(\d{5})\.npz")


@dataclass
class PseudoReport:
    shards_total: int
    shards_written: int  # including the rewritten ones
    shards_skipped: int
    windows: int
    shards_rewritten: int = 0
    shards_removed: int = 0


def shard_path(out: Path, k: int) -> Path:
    return out / f"shard-{k:05d}.npz"


def _shard_meta(path: Path) -> dict | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return json.loads(str(z["meta"]))
    except (OSError, ValueError, KeyError) as e:
        log.warning("%s is unreadable (%s); it will be rewritten", path, e)
        return None


def track_records(group: list[Track], cache: FeatureCache) -> list[dict]:
    """What a shard's windows come from: id, path and cached content key per track."""
    return [{"id": t.id, "path": t.path, "content": cache.entry(t).key} for t in group]


def tracks_sha256(records: list[dict]) -> str:
    return hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()


def _show(key: str, value) -> str:
    if key == "tags" and isinstance(value, list):
        return f"{len(value)} tags ({', '.join(value[:3])}, ...)"
    if key == "teacher_sha256" and isinstance(value, str):
        return value[:12] + "..."
    return repr(value)


def _stale_reason(path: Path, old: dict, new: dict) -> str | None:
    """None when ``path`` matches ``new``; else why it is rewritten. Refusals raise."""
    for key in FOLDER_KEYS:
        if key in old and old[key] != new[key]:
            raise ConfigError(
                f"{path} was made with {key} = {_show(key, old[key])}, this run has "
                f"{_show(key, new[key])}; a folder holds the labels of one teacher, tag list "
                f"and hop, so it is not mixed: use a new output folder or delete this one")
    missing = [k for k in (*FOLDER_KEYS, "tracks_sha256") if k not in old]
    if missing:
        return f"its meta lacks {missing} (written by an older rtagger)"
    if old["tracks_sha256"] == new["tracks_sha256"]:
        return None
    before = {r["id"]: r for r in old.get("tracks", [])}
    now = {r["id"]: r for r in new["tracks"]}
    added, removed = sorted(set(now) - set(before)), sorted(set(before) - set(now))
    changed = sorted(i for i in set(now) & set(before) if now[i] != before[i])
    parts = [f"{len(added)} tracks added ({', '.join(added[:3])})" if added else "",
             f"{len(removed)} removed ({', '.join(removed[:3])})" if removed else "",
             f"{len(changed)} with another path or audio ({', '.join(changed[:3])})"
             if changed else ""]
    return "its tracks changed: " + ("; ".join(p for p in parts if p) or "order differs")


class _CheckpointLabeller:
    """One rtagger checkpoint as a teacher: sigmoid of its window tagger."""

    def __init__(self, model) -> None:
        self.model = model
        self.tags = list(model.tags)
        self.sha256 = model.weights_sha256
        self.members = [{"name": model.name, "sha256": model.weights_sha256}]

    @torch.inference_mode()
    def __call__(self, waves: torch.Tensor) -> np.ndarray:
        logits, _ = self.model.tagger(waves)
        return torch.sigmoid(logits).float().cpu().numpy()


def pseudo_label(teacher: str | Path | None, tracks: list[Track], cache_dir: str | Path,
                 out_dir: str | Path, *, hop_s: float = WINDOW_S, device: str | None = None,
                 progress: bool = True, musicnn: tuple[str | Path, ...] = ()) -> PseudoReport:
    """Label all windows of ``tracks`` with ``teacher``; resumable and shardable.

    ``hop_s`` is the hop between window starts in seconds. With ``musicnn`` (converted
    musicnn teacher files), the labels are the multi-source ensemble's over vocabulary v2
    (:mod:`rtagger.train.teachers.ensemble`; ``teacher``, if given, supplies v1's tags),
    NaN where no member labels a tag. Raises :class:`ConfigError` when ``out_dir`` holds
    shards of another teacher, tag list, hop or window length.
    """
    info = init_distributed()
    dev = device or (f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu")
    if musicnn:
        from rtagger.train.teachers.ensemble import load_ensemble

        model = load_ensemble(teacher, list(musicnn), device=dev)
    elif teacher is None:
        raise ConfigError("pseudo-labelling needs a teacher checkpoint or musicnn teachers")
    else:
        model = _CheckpointLabeller(load_model(teacher, device=dev))
    cache = FeatureCache(cache_dir)
    tracks = sorted(cached_only(tracks, cache, "unlabelled data"), key=lambda t: t.id)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hop = round(hop_s * SAMPLE_RATE)
    base = {"format": SHARD_FORMAT, "teacher": str(teacher),
            "teacher_sha256": model.sha256, "members": model.members, "tags": model.tags,
            "hop_samples": hop, "window_samples": WINDOW_SAMPLES}
    n_shards = (len(tracks) + TRACKS_PER_SHARD - 1) // TRACKS_PER_SHARD
    mine = [k for k in range(n_shards) if k % info.world == info.rank]
    report = PseudoReport(n_shards, 0, 0, 0)
    report.shards_removed = _remove_extra_shards(out, n_shards, info.rank, info.world)
    bar = Bar("pseudo-labelling shards", len(mine), enabled=progress and info.main)
    for k in mine:
        path = shard_path(out, k)
        group = tracks[k * TRACKS_PER_SHARD : (k + 1) * TRACKS_PER_SHARD]
        records = track_records(group, cache)
        meta = {**base, "tracks": records, "tracks_sha256": tracks_sha256(records)}
        if path.exists():
            old = _shard_meta(path)
            reason = "it is unreadable" if old is None else _stale_reason(path, old, meta)
            if reason is None:
                report.shards_skipped += 1
                bar.advance()
                continue
            log.warning("rewriting %s: %s", path, reason)
            report.shards_rewritten += 1
        refs, starts, probs = _label_group(model, cache, group, hop, dev)
        buf = io.BytesIO()
        np.savez(buf, refs=np.array(refs), starts=np.array(starts, np.int64),
                 probs=probs.astype(np.float16), meta=json.dumps(meta))
        atomic_write(path, buf.getvalue())
        report.shards_written += 1
        report.windows += len(refs)
        bar.advance()
    bar.close()
    if info.world > 1:  # the next step (training) reads every rank's shards
        dist.barrier()
    return report


def _remove_extra_shards(out: Path, n_shards: int, rank: int, world: int) -> int:
    """Delete this rank's shards numbered ``>= n_shards`` (left by a longer track list)."""
    removed = 0
    for path in sorted(out.glob("shard-*.npz")):
        m = _SHARD_NAME.fullmatch(path.name)
        if m and int(m.group(1)) >= n_shards and int(m.group(1)) % world == rank:
            log.warning("removing %s: the track list now makes only %d shards", path, n_shards)
            path.unlink()
            removed += 1
    return removed


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
        probs.append(model(waves))
    return ([t.path for t, _ in items], [s for _, s in items],
            np.concatenate(probs) if probs else np.zeros((0, len(model.tags)), np.float32))
