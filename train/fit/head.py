"""``rtagger train head``: a platform's own tags learned on a catalog's frozen embeddings.

A platform's labels are noisy and mostly missing: a labels CSV has a ``track`` column (a
catalog track id, its source path, or the ``id`` its manifest gave it) and one column per
tag holding 1 / 0 / blank (blank: unknown, masked out of the loss and of every score).

The head is one linear layer on the frozen tagger's *window* embeddings, read from the
catalog (``window_embeddings``; no audio is decoded). A track's probability is the mean of
its windows' sigmoid outputs, each window weighed by its share of real audio: exactly what
the runtime's mean aggregation computes, so the checkpoint reproduces at tag time what was
trained here. Loss: binary cross-entropy on the labelled (track, tag) entries only, plus L2
on the weights; full-batch Adam (10,000 tracks of ~20 windows are a few hundred thousand
128-d rows: seconds per epoch on a CPU core).

The report is cross-validated (``folds`` folds over tracks; each track is scored by the
head that did not see it): per tag ROC-AUC and PR-AUC (average precision) with 95%
bootstrap intervals over tracks, and a calibration table of the out-of-fold predictions
(10 bins of predicted probability: count, mean prediction, observed rate). With a
``truth`` CSV (the clean labels of a benchmark) the same out-of-fold predictions are also
scored against it, which is what "recovers" means when the training labels were hidden
and flipped.

The checkpoint is the catalog's model with its output layer replaced by the head and no
aggregator (tracks aggregate by mean): a standard rtagger checkpoint, so ``tag``,
``serve``, ``stream``, ``catalog add`` and ``info`` take it like any other; its recipe
names the base model, catalog and labels, its metrics hold the report's summary.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rtagger.audio.decode import SAMPLE_RATE, WINDOW_SAMPLES
from rtagger.catalog.store import Catalog, CatalogError
from rtagger.errors import ConfigError
from rtagger.model.checkpoint import TaggingModel, load_model, save_model
from rtagger.model.network import ChunkTagger

_TRUE = {"1", "1.0", "true", "yes", "y", "t"}
_FALSE = {"0", "0.0", "false", "no", "n", "f"}


@dataclass(frozen=True)
class HeadConfig:
    epochs: int = 300
    lr: float = 0.01
    weight_decay: float = 1e-3  # L2 on the head's weights (not the bias)
    folds: int = 5
    seed: int = 0
    bootstrap: int = 200  # resamples for the 95% intervals


@dataclass
class Windows:
    """Every window of the labelled tracks: embeddings ``(N, d)``, track index ``(N,)``
    and weight ``(N,)`` (share of real audio)."""

    emb: torch.Tensor
    track: torch.Tensor
    weight: torch.Tensor
    n_tracks: int


def read_labels(path: Path, catalog: Catalog) -> tuple[list[int], list[str], np.ndarray]:
    """Catalog track ids, tag names and labels ``(tracks, tags)`` float32 (NaN: unknown)."""
    setup = catalog.setup()
    recs = catalog.tracks(setup_id=setup.id)
    by_key: dict[str, int] = {}
    for r in recs:
        by_key[str(r.id)] = r.id
        by_key[r.source] = r.id
        if r.meta and r.meta.get("id") is not None:
            by_key[str(r.meta["id"])] = r.id
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        head = next(reader, None)
        if not head or head[0] != "track" or len(head) < 2:
            raise ConfigError(f"{path}: the first row must be 'track,TAG1,TAG2,...'")
        tags = [t.strip() for t in head[1:]]
        ids, rows = [], []
        for lineno, row in enumerate(reader, start=2):
            if not row:
                continue
            key = row[0].strip()
            if key not in by_key:
                raise ConfigError(f"{path}:{lineno}: track {key!r} is not in {catalog.path} "
                                  f"(setup {setup.id}); use a track id, source or manifest id")
            ids.append(by_key[key])
            rows.append([_label(v, path, lineno) for v in row[1 : len(tags) + 1]]
                        + [math.nan] * (len(tags) + 1 - len(row)))
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{path}: a track is listed twice")
    y = np.array(rows, np.float32).reshape(len(ids), len(tags))
    return ids, tags, y


def _label(v: str, path: Path, lineno: int) -> float:
    v = v.strip().lower()
    if v == "":
        return math.nan
    if v in _TRUE:
        return 1.0
    if v in _FALSE:
        return 0.0
    raise ConfigError(f"{path}:{lineno}: label {v!r} is not 1, 0 or blank")


def load_windows(catalog: Catalog, ids: list[int]) -> Windows:
    setup = catalog.setup()
    hop = round(setup.hop_s * SAMPLE_RATE)
    embs, track, weight = [], [], []
    recs = catalog.tracks(ids, window_embeddings=True)
    if len(recs) != len(ids):
        raise CatalogError("some labelled tracks vanished from the catalog")
    for i, r in enumerate(recs):
        if r.setup_id != setup.id:
            raise CatalogError(f"track {r.id} was tagged by another model; re-add it")
        n = len(r.window_embeddings)
        total = round(r.duration_s * SAMPLE_RATE)
        valid = np.clip(total - hop * np.arange(n), 1, WINDOW_SAMPLES)
        embs.append(r.window_embeddings.astype(np.float32))
        track.append(np.full(n, i))
        weight.append(valid / WINDOW_SAMPLES)
    return Windows(torch.from_numpy(np.concatenate(embs)),
                   torch.from_numpy(np.concatenate(track)).long(),
                   torch.from_numpy(np.concatenate(weight)).float(), len(ids))


def track_probs(w: Windows, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``(tracks, tags)``: the weighted mean of window sigmoids (the runtime's mean)."""
    p = torch.sigmoid(w.emb @ weight + bias) * w.weight[:, None]
    num = torch.zeros(w.n_tracks, p.shape[1]).index_add_(0, w.track, p)
    den = torch.zeros(w.n_tracks).index_add_(0, w.track, w.weight)
    return num / den[:, None]


def fit_head(w: Windows, y: np.ndarray, train: np.ndarray, cfg: HeadConfig) -> tuple[
        torch.Tensor, torch.Tensor]:
    """Head weights ``(d, tags)`` and bias ``(tags,)`` fitted on the rows ``train`` of
    ``y`` (masked BCE: NaN labels do not count)."""
    yt = torch.from_numpy(np.where(np.isnan(y), 0.0, y)).float()
    mask = torch.from_numpy(~np.isnan(y) & train[:, None]).float()
    prior = ((yt * mask).sum(0) + 1) / (mask.sum(0) + 2)
    gen = torch.Generator().manual_seed(cfg.seed)
    weight = (0.01 * torch.randn(w.emb.shape[1], y.shape[1], generator=gen)).requires_grad_()
    bias = torch.log(prior / (1 - prior)).clone().requires_grad_()
    opt = torch.optim.Adam([weight, bias], lr=cfg.lr)
    n = mask.sum().clamp(min=1)
    for _ in range(cfg.epochs):
        opt.zero_grad()
        p = track_probs(w, weight, bias).clamp(1e-6, 1 - 1e-6)
        bce = -(yt * torch.log(p) + (1 - yt) * torch.log(1 - p))
        loss = (bce * mask).sum() / n + cfg.weight_decay * (weight**2).sum()
        loss.backward()
        opt.step()
    return weight.detach(), bias.detach()


def cross_validate(w: Windows, y: np.ndarray, cfg: HeadConfig) -> np.ndarray:
    """Out-of-fold track probabilities ``(tracks, tags)``."""
    rng = np.random.default_rng(cfg.seed)
    fold = rng.permutation(len(y)) % cfg.folds
    oof = np.zeros_like(y)
    for k in range(cfg.folds):
        weight, bias = fit_head(w, y, fold != k, cfg)
        with torch.no_grad():
            oof[fold == k] = track_probs(w, weight, bias).numpy()[fold == k]
    return oof


def score(y: np.ndarray, p: np.ndarray, tags: list[str], cfg: HeadConfig) -> dict:
    """Per-tag ROC-AUC / PR-AUC with 95% bootstrap intervals, and a calibration table."""
    from rtagger.train.evaluation.evaluate import METRICS, bootstrap_ci, macro_auc

    per_tag = {}
    for j, tag in enumerate(tags):
        known = ~np.isnan(y[:, j])
        yy, pp = y[known, j], p[known, j]
        row = {"labelled": int(known.sum()), "positives": int(yy.sum())}
        if 0 < yy.sum() < len(yy):  # the project's metrics, on this tag's labelled tracks
            value = macro_auc(yy[:, None], pp[:, None])
            for m in METRICS:
                row[m] = value[m]
                try:
                    row[f"{m}_95"] = list(bootstrap_ci(yy[:, None], pp[:, None], m,
                                                       n=cfg.bootstrap, seed=cfg.seed + 1 + j))
                except ValueError:  # too few labelled tracks for any scorable resample
                    row[f"{m}_95"] = [math.nan, math.nan]
            row["prevalence"] = float(yy.mean())  # PR-AUC of a random ranking
        per_tag[tag] = row
    known = ~np.isnan(y)
    yy, pp = y[known], p[known]
    edges = np.linspace(0, 1, 11)
    calib = []
    for lo, hi in itertools.pairwise(edges):
        inside = (pp >= lo) & ((pp < hi) if hi < 1 else (pp <= hi))
        if inside.any():
            calib.append({"bin": [round(lo, 1), round(hi, 1)], "count": int(inside.sum()),
                          "mean_predicted": float(pp[inside].mean()),
                          "observed": float(yy[inside].mean())})
    rocs = [r["roc_auc"] for r in per_tag.values() if "roc_auc" in r]
    prs = [r["pr_auc"] for r in per_tag.values() if "pr_auc" in r]
    return {"macro_roc_auc": float(np.mean(rocs)) if rocs else None,
            "macro_pr_auc": float(np.mean(prs)) if prs else None,
            "per_tag": per_tag, "calibration": calib}


def head_checkpoint(catalog: Catalog, tags: list[str], weight: torch.Tensor,
                    bias: torch.Tensor, out: Path, recipe: dict, metrics: dict) -> Path:
    """The catalog's model with the head as its output layer, saved as ``out``."""
    setup = catalog.setup()
    base = load_model(setup.model_source)
    if base.weights_sha256 != setup.weights_sha256:
        raise CatalogError(f"{setup.model_source} is not the model that tagged "
                           f"{catalog.path} (weights sha256 differ)")
    cfg = dataclasses.replace(base.tagger.cfg, n_tags=len(tags))
    tagger = ChunkTagger(cfg)
    state = {k: v for k, v in base.tagger.state_dict().items() if not k.startswith("head.")}
    state["head.weight"] = weight.T.contiguous()
    state["head.bias"] = bias.contiguous()
    tagger.load_state_dict(state)
    model = TaggingModel(tagger.eval(), None, list(tags), {t: "platform" for t in tags},
                         name=out.stem, trained=True,
                         recipe={"stage": "head", "base_model": {
                             "name": base.name, "weights_sha256": base.weights_sha256,
                             "source": setup.model_source}, **recipe},
                         metrics=metrics)
    return save_model(model, out)


def train_head(db: Path, labels: Path, out: Path, cfg: HeadConfig = HeadConfig(),
               truth: Path | None = None) -> dict:
    """Cross-validate, fit on every label, write the checkpoint; returns the report."""
    with Catalog(db, create=False) as catalog:
        ids, tags, y = read_labels(labels, catalog)
        if len(ids) < cfg.folds:
            raise ConfigError(f"{labels}: {len(ids)} tracks for {cfg.folds} folds")
        w = load_windows(catalog, ids)
        oof = cross_validate(w, y, cfg)
        report = {"tracks": len(ids), "windows": len(w.emb), "tags": tags,
                  "labelled_share": float((~np.isnan(y)).mean()),
                  "config": dataclasses.asdict(cfg), "cross_validated": score(y, oof, tags, cfg)}
        if truth is not None:
            t_ids, t_tags, t_y = read_labels(truth, catalog)
            pos = {t: i for i, t in enumerate(t_ids)}
            cols = [t_tags.index(t) for t in tags]
            clean = np.array([t_y[pos[i], cols] for i in ids], np.float32)
            report["against_truth"] = score(clean, oof, tags, cfg)
        weight, bias = fit_head(w, y, np.ones(len(ids), bool), cfg)
        cv = report["cross_validated"]
        metrics = {"head_cv_macro_roc_auc": cv["macro_roc_auc"],
                   "head_cv_macro_pr_auc": cv["macro_pr_auc"],
                   "head_cv_per_tag_roc_auc": {t: r.get("roc_auc")
                                               for t, r in cv["per_tag"].items()}}
        head_checkpoint(catalog, tags, weight, bias, out,
                        {"catalog": str(db), "labels": str(labels), "tracks": len(ids),
                         "head": dataclasses.asdict(cfg)}, metrics)
    report["checkpoint"] = str(out)
    return report


def noisy_labels(db: Path, tags: list[str], hide: float, flip: float, seed: int,
                 out: Path, truth_out: Path) -> dict:
    """Benchmark labels from the manifest tags in a catalog's meta: every label is written
    to ``truth_out``; ``out`` keeps a ``1 - hide`` share of them, with ``flip`` of those
    inverted (the noisy, partial labels a platform has)."""
    from rtagger.atomic import atomic_write

    if not (0 <= hide < 1 and 0 <= flip < 0.5):
        raise ConfigError("need 0 <= hide < 1 and 0 <= flip < 0.5")
    rng = np.random.default_rng(seed)
    with Catalog(db, create=False) as catalog:
        recs = [r for r in catalog.tracks(setup_id=catalog.setup().id)
                if r.meta and isinstance(r.meta.get("tags"), list)]
    y = np.array([[t in r.meta["tags"] for t in tags] for r in recs], np.float32)
    shown = rng.random(y.shape) >= hide
    flipped = shown & (rng.random(y.shape) < flip)
    noisy = np.where(flipped, 1 - y, y)

    def table(values: np.ndarray, keep: np.ndarray) -> str:
        lines = [",".join(["track", *tags])]
        for r, row, k in zip(recs, values, keep, strict=True):
            lines.append(",".join([str(r.id), *(str(int(v)) if kk else ""
                                                for v, kk in zip(row, k, strict=True))]))
        return "\n".join(lines) + "\n"

    atomic_write(truth_out, table(y, np.ones_like(shown)))
    atomic_write(out, table(noisy, shown))
    return {"tracks": len(recs), "tags": tags, "shown": float(shown.mean()),
            "flipped_of_shown": float(flipped.sum() / max(shown.sum(), 1))}
