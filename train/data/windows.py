"""Training examples: 3.69 s windows of cached audio with song (MIL) or pseudo labels.

Multiple-instance learning: a labelled window inherits its song's tags; windows carry no
labels of their own. Pseudo-labelled windows carry the teacher's soft probabilities.
Audio comes from the feature cache (:mod:`rtagger.train.data.cache`) as 16 kHz PCM, because waveform
augmentation must happen before the log-mel.

Sampling is driven by an explicit ``numpy.random.Generator`` whose state the training loop
checkpoints, so a resumed run draws the same batches as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rtagger.audio.decode import SAMPLE_RATE, WINDOW_SAMPLES
from rtagger.errors import ConfigError
from rtagger.model.vocab import tags_v1
from rtagger.train.data.cache import FeatureCache
from rtagger.train.data.manifest import Track

log = logging.getLogger(__name__)


def tag_list_for(tracks: list[Track]) -> list[str]:
    """Vocabulary v1 when the tracks use it, else the manifest's tags by frequency."""
    used = {t for tr in tracks for t in tr.tags}
    v1 = tags_v1()
    if used <= set(v1):
        return v1
    counts: dict[str, int] = {}
    for tr in tracks:
        for t in tr.tags:
            counts[t] = counts.get(t, 0) + 1
    return sorted(counts, key=lambda t: (-counts[t], t))


def multi_hot(tracks: list[Track], tags: list[str]) -> np.ndarray:
    """``(len(tracks), len(tags))`` float32 targets; unknown tags are an error."""
    index = {t: i for i, t in enumerate(tags)}
    y = np.zeros((len(tracks), len(tags)), np.float32)
    for r, tr in enumerate(tracks):
        for t in tr.tags:
            if t not in index:
                raise ConfigError(f"track {tr.id}: tag {t!r} is not in the model's tag list")
            y[r, index[t]] = 1.0
    return y


def labelled_subset(tracks: list[Track], fraction: float, seed: int) -> list[Track]:
    """A deterministic subset by hashing ids: the same songs for every run and machine."""
    if fraction >= 1.0:
        return list(tracks)
    def score(tr: Track) -> float:
        h = hashlib.sha256(f"{seed}:{tr.id}".encode()).digest()
        return int.from_bytes(h[:8], "big") / 2**64
    return [tr for tr in tracks if score(tr) < fraction]


def cached_only(tracks: list[Track], cache: FeatureCache, what: str) -> list[Track]:
    kept = [t for t in tracks if t in cache]
    if len(kept) < len(tracks):
        log.warning("%s: %d of %d tracks are not in the feature cache and are skipped "
                    "(run `rtagger data cache`)", what, len(tracks) - len(kept), len(tracks))
    if not kept:
        raise ConfigError(f"{what}: none of the tracks are in the feature cache "
                          f"{cache.root}; run `rtagger data cache` first")
    return kept


class LabelledWindows:
    """Random crops of labelled songs; each crop's target is its song's tags.

    ``defined``: the tags the songs' labels decide (present or absent); the others are
    NaN (no label, masked by the loss) unless ``teacher`` gives the song a soft target
    for them (path -> ``(len(tags),)`` song mean of a teacher's window probabilities).
    """

    def __init__(self, tracks: list[Track], cache: FeatureCache, tags: list[str], *,
                 defined: list[str] | None = None,
                 teacher: dict[str, np.ndarray] | None = None) -> None:
        self.tracks = cached_only(tracks, cache, "labelled data")
        self.cache = cache
        self.targets = multi_hot(self.tracks, tags)
        if defined is not None:
            undefined = np.array([t not in set(defined) for t in tags])
            self.targets[:, undefined] = np.nan
            for r, tr in enumerate(self.tracks):
                soft = (teacher or {}).get(tr.path)
                if soft is not None:
                    self.targets[r, undefined] = soft[undefined]
        self.lengths = np.array([round(cache.duration(t) * SAMPLE_RATE) for t in self.tracks])

    def __len__(self) -> int:
        return len(self.tracks)

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        idx = rng.integers(0, len(self.tracks), n)
        starts = (rng.random(n) * np.maximum(self.lengths[idx] - WINDOW_SAMPLES, 0)).astype(
            np.int64)
        waves = np.stack([self.cache.window_pcm(self.tracks[i], int(s))
                          for i, s in zip(idx, starts, strict=True)])
        return waves, self.targets[idx]


@dataclass(frozen=True)
class PseudoShard:
    refs: list[str]  # track path per window (cache lookups)
    starts: np.ndarray  # (n,) start sample
    probs: np.ndarray  # (n, n_tags) teacher probabilities (float16 on disk)
    meta: dict


def read_shard(path: Path) -> PseudoShard:
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        return PseudoShard(list(z["refs"]), z["starts"], z["probs"].astype(np.float32), meta)


class PseudoWindows:
    """Windows of unlabelled songs with the teacher's soft labels (from pseudo shards)."""

    def __init__(self, folders: tuple[str, ...], cache: FeatureCache, tags: list[str]) -> None:
        refs, starts, probs, teachers = [], [], [], set()
        for folder in folders:
            shards = sorted(Path(folder).glob("shard-*.npz"))
            if not shards:
                raise ConfigError(f"pseudo-label folder {folder} holds no shard-*.npz files; "
                                  f"run `rtagger train pseudo` first")
            for path in shards:
                s = read_shard(path)
                if s.meta["tags"] != tags:
                    raise ConfigError(f"{path}: pseudo-labels use another tag list")
                teachers.add(s.meta["teacher_sha256"])
                refs += s.refs
                starts.append(s.starts)
                probs.append(s.probs)
        self.cache = cache
        self.refs = refs
        self.starts = np.concatenate(starts)
        self.probs = np.concatenate(probs)
        self.teachers = sorted(teachers)

    def __len__(self) -> int:
        return len(self.refs)

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        idx = rng.integers(0, len(self.refs), n)
        waves = np.stack([self.cache.window_pcm(self.refs[i], int(self.starts[i])) for i in idx])
        return waves, self.probs[idx]

    def song_targets(self) -> dict[str, np.ndarray]:
        """Song-level soft targets: the mean teacher probability over each song's windows."""
        sums: dict[str, np.ndarray] = {}  # a tag no teacher labels stays NaN
        counts: dict[str, int] = {}
        for ref, p in zip(self.refs, self.probs, strict=True):
            sums[ref] = sums.get(ref, 0) + p
            counts[ref] = counts.get(ref, 0) + 1
        return {ref: sums[ref] / counts[ref] for ref in sums}


def song_windows(length: int, per_song: int, hop: int = WINDOW_SAMPLES) -> list[int]:
    """Start samples of up to ``per_song`` evenly spread windows covering a song."""
    last = max(length - WINDOW_SAMPLES, 0)
    n_all = last // hop + 1
    if n_all <= per_song:
        return [i * hop for i in range(n_all)]
    return [round(x) for x in np.linspace(0, last, per_song)]


class EvalWindows:
    """Fixed validation windows: evenly spread over each song, song labels attached."""

    def __init__(self, tracks: list[Track], cache: FeatureCache, tags: list[str],
                 per_song: int) -> None:
        self.tracks = cached_only(tracks, cache, "validation data")
        self.cache = cache
        self.targets = multi_hot(self.tracks, tags)
        self.items: list[tuple[int, int]] = []  # (song index, start sample)
        for i, tr in enumerate(self.tracks):
            length = round(cache.duration(tr) * SAMPLE_RATE)
            self.items += [(i, s) for s in song_windows(length, per_song)]

    def batches(self, batch_size: int):
        """Yield ``(waves, song_index)`` batches in a fixed order."""
        for b in range(0, len(self.items), batch_size):
            chunk = self.items[b : b + batch_size]
            waves = np.stack([self.cache.window_pcm(self.tracks[i], s) for i, s in chunk])
            yield waves, np.array([i for i, _ in chunk])
