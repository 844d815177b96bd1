"""Training stages for :func:`rtagger.train.fit.loop.train`: window tagger, track aggregator.

``TaggerTask`` trains a :class:`~rtagger.model.network.ChunkTagger` on random crops of labelled
songs (multiple-instance learning: a crop inherits its song's tags), optionally mixed with
pseudo-labelled windows of unlabelled audio (soft teacher probabilities). Noise for the
noisy student comes from the recipe: waveform augmentation, dropout, stochastic depth.
Teacher, noisy student (expansion) and distilled compact student are this task with
different recipes.

``AggregatorTask`` trains a :class:`~rtagger.model.aggregator.ContextAggregator` on sequences of
window embeddings from a frozen tagger, supervised by song labels, with sequences cut at
random lengths and thinned exactly like the live track context
(:func:`rtagger.pipeline.aggregate.context_indices`).
"""

from __future__ import annotations

import copy
import io
import itertools
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rtagger.atomic import atomic_write
from rtagger.audio.decode import SAMPLE_RATE, WINDOW_S
from rtagger.errors import ConfigError
from rtagger.model.aggregator import ContextAggregator, aggregator_config
from rtagger.model.checkpoint import TaggingModel, load_model
from rtagger.model.network import ChunkTagger, tagger_config, with_window_features
from rtagger.model.vocab import tag_groups, vocabulary_tags
from rtagger.pipeline.aggregate import context_indices, pad_contexts
from rtagger.train.data.cache import FeatureCache
from rtagger.train.data.manifest import Track, read_manifest
from rtagger.train.data.windows import (
    EvalWindows,
    LabelledWindows,
    PseudoWindows,
    labelled_subset,
    multi_hot,
    song_windows,
    tag_list_for,
)
from rtagger.train.evaluation.evaluate import macro_auc
from rtagger.train.fit.augment import augmented_logits, augmenters
from rtagger.train.fit.recipe import Recipe
from rtagger.train.progress import Bar
from rtagger.train.synth.labels import prefix_labels

log = logging.getLogger(__name__)
EVAL_BATCH = 32


def _seeded(seed: int, build):
    """``build()`` with torch's global CPU RNG seeded from the recipe, then restored.

    torch seeds itself randomly per process, so without this the same recipe would start
    from other weights in every run (and a DDP run's rank 0 would broadcast them).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class TaggerTask:
    def __init__(self, recipe: Recipe) -> None:
        d = recipe.data
        if not d.labelled or not d.valid:
            raise ConfigError(f"{recipe.name}: data.labelled and data.valid are required")
        self.recipe = recipe
        self.cache = FeatureCache(d.cache)
        train_tracks = read_manifest(d.labelled)
        defined = tag_list_for(train_tracks)
        self.tags = vocabulary_tags(d.vocabulary) if d.vocabulary else defined
        outside = [t for t in defined if t not in self.tags]
        if outside:
            raise ConfigError(f"{recipe.name}: labelled tags {outside[:5]} are not in "
                              f"vocabulary {d.vocabulary}")
        # Metrics are computed on the tags the labelled (and validation) songs decide.
        self.eval_columns = np.array([self.tags.index(t) for t in defined])
        teacher = (PseudoWindows(d.labelled_pseudo, self.cache, self.tags).song_targets()
                   if d.labelled_pseudo else None)
        labelled = labelled_subset(train_tracks, d.labelled_fraction, d.subset_seed)
        self.labelled = LabelledWindows(labelled, self.cache, self.tags,
                                        defined=defined if d.vocabulary else None,
                                        teacher=teacher)
        self.pseudo = (PseudoWindows(d.pseudo, self.cache, self.tags)
                       if d.pseudo_ratio > 0 else None)
        self.valid = EvalWindows(read_manifest(d.valid), self.cache, self.tags,
                                 d.valid_windows_per_song)
        m = recipe.model
        self.model = _seeded(recipe.seed, lambda: ChunkTagger(tagger_config(
            m.size, len(self.tags), dropout=m.dropout, drop_path=m.drop_path, **m.arch)))
        if m.init:
            self._warm_start(m.init)
        self.augment, self.spec_mask = augmenters(recipe.augment)
        log.info("%s: %d labelled songs, %d pseudo windows, %d validation windows",
                 recipe.name, len(self.labelled), len(self.pseudo or []),
                 len(self.valid.items))

    def _warm_start(self, path: str) -> None:
        """Start from a trained tagger (a later noisy-student round on a CPU budget).

        The architecture and tag list must match; dropout and stochastic depth may differ.
        """
        init = load_model(path)
        if list(init.tags) != list(self.tags):
            raise ConfigError(f"{self.recipe.name}: model.init {path} has other tags than "
                              f"the labelled data")
        mine, theirs = asdict(self.model.cfg), asdict(init.tagger.cfg)
        noise = ("dropout", "drop_path")  # training-time settings, not the architecture
        diff = [k for k in mine if k not in noise and mine[k] != theirs[k]]
        if diff:
            raise ConfigError(f"{self.recipe.name}: model.init {path} differs in {diff}")
        self.model.load_state_dict(init.tagger.state_dict())
        log.info("%s: weights start from %s (%s)", self.recipe.name, path,
                 init.weights_sha256[:12])

    def batch(self, rng: np.random.Generator, n: int):
        n_pseudo = round(n * self.recipe.data.pseudo_ratio) if self.pseudo is not None else 0
        waves, targets = self.labelled.sample(rng, n - n_pseudo)
        if n_pseudo:
            pw, pt = self.pseudo.sample(rng, n_pseudo)
            waves, targets = np.concatenate([waves, pw]), np.concatenate([targets, pt])
        return torch.from_numpy(waves), torch.from_numpy(targets)

    def loss_inputs(self, model: nn.Module, waves: torch.Tensor, gen: torch.Generator):
        return augmented_logits(model, waves, gen, self.augment, self.spec_mask)

    @torch.no_grad()
    def predict_valid(self, model: nn.Module, device: torch.device):
        """Window probabilities ``(windows, tags)`` and their song indices."""
        probs, songs = [], []
        for waves, idx in self.valid.batches(EVAL_BATCH):
            logits, _ = model(torch.from_numpy(waves).to(device))
            probs.append(torch.sigmoid(logits).float().cpu().numpy())
            songs.append(idx)
        return np.concatenate(probs), np.concatenate(songs)

    def evaluate(self, model: nn.Module, device: torch.device) -> dict:
        probs, songs = self.predict_valid(_unwrap(model), device)
        probs = probs[:, self.eval_columns]
        y_song = self.valid.targets[:, self.eval_columns]
        y_win = y_song[songs]
        song_scores = np.stack([probs[songs == i].mean(0)
                                for i in range(len(self.valid.tracks))])
        song = macro_auc(y_song, song_scores)
        return {
            "macro_pr_auc": song["pr_auc"], "macro_roc_auc": song["roc_auc"],
            "window_macro_pr_auc": macro_auc(y_win, probs)["pr_auc"],
        }

    def export(self, model: nn.Module, metrics: dict) -> TaggingModel:
        tagger = copy.deepcopy(_unwrap(model)).cpu().eval()
        return TaggingModel(tagger, None, list(self.tags), tag_groups(self.tags),
                            name=self.recipe.name, trained=True,
                            metrics={k: v for k, v in metrics.items() if np.isscalar(v)})


class AggregatorTask:
    """Train the track-context aggregator on embeddings of a frozen tagger."""

    def __init__(self, recipe: Recipe, out_dir: str | Path) -> None:
        d, a = recipe.data, recipe.aggregator
        if not recipe.model.init:
            raise ConfigError(f"{recipe.name}: model.init must name the frozen tagger "
                              f"checkpoint whose embeddings the aggregator reads")
        self.recipe = recipe
        self.base = load_model(recipe.model.init)
        if a.chroma or a.tempo:
            self.base.tagger = with_window_features(self.base.tagger, a.chroma, a.tempo)
        self.tags = self.base.tags
        self.cache = FeatureCache(d.cache)
        train_tracks = labelled_subset(read_manifest(d.labelled), d.labelled_fraction,
                                       d.subset_seed)
        valid_tracks = read_manifest(d.valid)
        hop = round(a.hop_s * SAMPLE_RATE)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.train_tracks = train_tracks
        self.train_seqs = self._embed(train_tracks, hop, out / "emb-train.npz")
        self.train_y = multi_hot(train_tracks, self.tags)
        self.valid_seqs = self._embed(valid_tracks, hop, out / "emb-valid.npz")
        self.valid_y = multi_hot(valid_tracks, self.tags)
        # A tagger with a wider vocabulary (v2) than the labelled songs decide: the other
        # tags have no song label (NaN, masked) and are left out of the metrics.
        defined = set(tag_list_for(train_tracks))
        self.eval_columns = np.array([i for i, t in enumerate(self.tags) if t in defined])
        self.tag_index = {t: i for i, t in enumerate(self.tags)}
        self.train_y[:, [t not in defined for t in self.tags]] = np.nan
        # Unlabelled songs join with song-level pseudo targets: the mean of the teacher's
        # window probabilities over the song (from the pseudo-label shards).
        self.pseudo_seqs, self.pseudo_y = [], np.zeros((0, len(self.tags)), np.float32)
        if d.pseudo_ratio > 0:
            songs = PseudoWindows(d.pseudo, self.cache, self.tags).song_targets()
            refs = sorted(songs)
            tracks = [Track(ref, ref, (), "unlabelled") for ref in refs]
            self.pseudo_seqs = self._embed(tracks, hop, out / "emb-pseudo.npz")
            self.pseudo_y = np.stack([songs[r] for r in refs]).astype(np.float32)
        tcfg = self.base.tagger.cfg
        cfg = aggregator_config(recipe.model.size, len(self.tags), tcfg.embedding_dim,
                                dropout=recipe.model.dropout, max_windows=a.max_windows,
                                **{"chroma_bins": tcfg.chroma_bins,
                                   "tempo_bins": tcfg.tempo_bins, **recipe.model.arch})
        self.model = _seeded(recipe.seed, lambda: ContextAggregator(cfg))
        if cfg.mean_skip:  # start from mean-pooled window logits: the tagger's own head
            self.model.skip.load_state_dict(self.base.tagger.head.state_dict())
        if cfg.window_probs:
            self.model.load_window_head(self.base.tagger.head)

    def _embed(self, tracks, hop: int, path: Path):
        """Embeddings and window probabilities of every window, cached in ``path``."""
        ids = [t.id for t in tracks]
        if path.exists():
            z = np.load(path, allow_pickle=False)
            # The same songs embedded by a tagger with the same embedding output.
            if (list(z["ids"]) == ids
                    and z["emb"].shape[-1] == self.base.tagger.cfg.embedding_dim):
                # Each z[key] reads the whole array again: read each once.
                emb, probs = z["emb"], z["probs"]
                return [(emb[a:b], probs[a:b]) for a, b in itertools.pairwise(z["offsets"])]
        tagger = self.base.tagger.eval()
        seqs = []
        bar = Bar(f"embedding {path.stem}", len(tracks))
        for tr in tracks:
            length = round(self.cache.duration(tr) * SAMPLE_RATE)
            starts = song_windows(length, 10**9, hop)
            embs, probs = [], []
            for b in range(0, len(starts), EVAL_BATCH):
                waves = np.stack([self.cache.window_pcm(tr, s) for s in starts[b:b + EVAL_BATCH]])
                with torch.no_grad():
                    logits, emb = tagger(torch.from_numpy(waves))
                embs.append(emb.numpy())
                probs.append(torch.sigmoid(logits).numpy())
            seqs.append((np.concatenate(embs), np.concatenate(probs)))
            bar.advance()
        bar.close()
        offsets = np.cumsum([0] + [len(e) for e, _ in seqs])
        buf = io.BytesIO()
        np.savez(buf, ids=np.array(ids), offsets=offsets,
                 emb=np.concatenate([e for e, _ in seqs]),
                 probs=np.concatenate([p for _, p in seqs]))
        atomic_write(path, buf.getvalue())
        return seqs

    def _context(self, emb: np.ndarray, n: int) -> np.ndarray:
        return emb[context_indices(n, self.recipe.aggregator.max_windows)]

    def batch(self, rng: np.random.Generator, n: int):
        a = self.recipe.aggregator
        n_pseudo = round(n * self.recipe.data.pseudo_ratio) if self.pseudo_seqs else 0
        picks = [(self.train_seqs, self.train_y, i)
                 for i in rng.integers(0, len(self.train_seqs), n - n_pseudo)]
        picks += [(self.pseudo_seqs, self.pseudo_y, i)
                  for i in rng.integers(0, len(self.pseudo_seqs), n_pseudo)]
        ctxs, targets = [], []
        for seqs, y, i in picks:
            emb = seqs[i][0]
            # A growing live context: the first L windows of the song, L random.
            length = max(int(rng.integers(min(a.min_windows, len(emb)), len(emb) + 1)), 1)
            ctxs.append(self._context(emb, length))
            target = y[i]
            if seqs is self.train_seqs and a.prefix_targets and length < len(emb):
                target = self._prefix_target(self.train_tracks[i], target, length)
            targets.append(target)
        return _pad(ctxs), torch.from_numpy(np.stack(targets))

    def _prefix_target(self, track: Track, song: np.ndarray, length: int) -> np.ndarray:
        """Targets of a song's first ``length`` windows: the tags their audio holds."""
        timeline = track.extra.get("timeline")
        if timeline is None:
            return song
        end_s = (length - 1) * self.recipe.aggregator.hop_s + WINDOW_S
        tags, undecided = prefix_labels({"tags": list(track.tags), "timeline": timeline}, end_s)
        target = song.copy()
        target[self.eval_columns] = 0.0
        target[[self.tag_index[t] for t in tags]] = 1.0
        target[[self.tag_index[t] for t in undecided]] = np.nan
        return target

    def loss_inputs(self, model: nn.Module, inputs, gen: torch.Generator):
        emb, valid = inputs
        return model(emb, valid)

    def evaluate(self, model: nn.Module, device: torch.device) -> dict:
        ctxs = [self._context(e, len(e)) for e, _ in self.valid_seqs]
        emb, valid = _pad(ctxs)
        with torch.no_grad():
            scores = torch.sigmoid(_unwrap(model)(emb.to(device), valid.to(device)))
        cols = self.eval_columns
        agg = scores.float().cpu().numpy()[:, cols]
        mean = np.stack([p.mean(0) for _, p in self.valid_seqs])[:, cols]
        y = self.valid_y[:, cols]
        scores = macro_auc(y, agg)
        return {"macro_pr_auc": scores["pr_auc"], "macro_roc_auc": scores["roc_auc"],
                "mean_pool_macro_pr_auc": macro_auc(y, mean)["pr_auc"]}

    def export(self, model: nn.Module, metrics: dict) -> TaggingModel:
        agg = copy.deepcopy(_unwrap(model)).cpu().eval()
        base = self.base
        return TaggingModel(base.tagger, agg, list(self.tags), dict(base.tag_groups),
                            name=self.recipe.name, trained=True,
                            metrics={**base.metrics, **{f"aggregator_{k}": v
                                                        for k, v in metrics.items()
                                                        if np.isscalar(v)}})


def _pad(ctxs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    emb, valid = pad_contexts(ctxs)
    return torch.from_numpy(emb), torch.from_numpy(valid)


def make_task(recipe: Recipe, out_dir: str | Path):
    if recipe.stage == "tagger":
        return TaggerTask(recipe)
    return AggregatorTask(recipe, out_dir)
