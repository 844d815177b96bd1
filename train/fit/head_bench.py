"""``rtagger train head-bench``: what ``train head`` costs at scale, on a synthetic catalog.

A measure of time and of the head's fitting, not of the tagger's embeddings: the tracks'
embeddings are drawn from the generative model below, not computed from audio (the
100-song demonstration in docs/catalog.md is the measure on real embeddings).

1. :func:`build_catalog` writes a real catalog file through :class:`Catalog` (one setup,
   one committed row per track: duration, content hash, track probabilities, L2-normalised
   track embedding, float16 taggram and window embeddings, meta with the planted tags).
2. :func:`~rtagger.train.fit.head.noisy_labels` (``train head-labels``'s code) writes the
   hidden, flipped labels and the clean truth from that meta.
3. :func:`~rtagger.train.fit.head.train_head` (``train head``'s function, its defaults
   unless asked) cross-validates, bootstraps, fits and writes the checkpoint; the head
   module's own functions are wrapped for the duration of the call to time its phases.

Generative model (the scales measured on the default model's window embeddings of 12
benchmark songs: per-dimension spread 0.74 between tracks, 0.40 within a track, a shared
offset of norm 7.7), per track ``i`` and window ``w``, embedding size ``d``::

    duration_i ~ U(40, 120) s, cut into 3.69 s windows as `catalog add` cuts them
    z_ij       ~ Bernoulli(prevalence_j)                platform tag j present
    a_ijw      ~ Bernoulli(q_ij) if z_ij else 0,  q_ij ~ U(0.5, 1)   audible in window w
    e_iw = m + B (s * g_i) + sum_j strength_j a_ijw u_j + 0.40 eps_iw

with ``u_j`` a random unit direction per tag, ``strength_j ~ U(0.25, 1.5)`` (from hard to
easy tags), ``prevalence_j ~ U(0.05, 0.4)``, ``m`` a random offset of norm 7.7, ``B`` a
random rotation, ``s_k`` proportional to ``k ** -0.5`` (a few directions carry most of
the spread, as in the real embeddings) with rms 0.74, and ``g_i``, ``eps_iw`` standard
normal. The taggram is the base model's own output layer on ``e_iw`` (sigmoid), the track
probabilities its weighted mean (aggregation ``mean``), the track embedding that of
``catalog add``. The ``oracle`` figure scores each tag by its planted direction, whitened
by the planted track spread, on the track's mean window embedding: about what a head that
knew the model could reach.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import os
import resource
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rtagger.audio.decode import SAMPLE_RATE, WINDOW_SAMPLES
from rtagger.catalog.add import track_embedding
from rtagger.catalog.store import Catalog, Setup, TrackRecord
from rtagger.errors import ConfigError
from rtagger.model.checkpoint import load_model, tags_sha256
from rtagger.model.vocab import vocabulary_version
from rtagger.train.fit import head as head_mod

# the head module's functions that train_head calls, timed as its phases
_TIMED = ("read_labels", "load_windows", "cross_validate", "score", "fit_head",
          "head_checkpoint")


@dataclass(frozen=True)
class SyntheticSpec:
    """The generative model's parameters (see the module docstring)."""

    tracks: int = 10_000
    tags: int = 20
    seed: int = 0
    duration_s: tuple[float, float] = (40.0, 120.0)
    strength: tuple[float, float] = (0.25, 1.5)
    prevalence: tuple[float, float] = (0.05, 0.4)
    audible: tuple[float, float] = (0.5, 1.0)  # share of a track's windows a tag shows in
    track_spread: float = 0.74  # rms per-dimension std of the track-level nuisance
    window_spread: float = 0.40  # per-dimension std of a window around its track
    offset_norm: float = 7.7

    def tag_names(self) -> list[str]:
        return [f"platform_{j:02d}" for j in range(self.tags)]


def window_valid(total: int, hop: int = WINDOW_SAMPLES) -> np.ndarray:
    """Real samples in each window :class:`~rtagger.audio.ringbuffer.Windower` cuts from a
    stream of ``total`` samples (full windows every ``hop``, then one padded remainder)."""
    full = 0 if total < WINDOW_SAMPLES else (total - WINDOW_SAMPLES) // hop + 1
    covered = (full - 1) * hop + WINDOW_SAMPLES if full else 0
    n = full + int(total > covered)
    return np.clip(total - hop * np.arange(n), 1, WINDOW_SAMPLES)


def build_catalog(db: Path, spec: SyntheticSpec, model: str = "default") -> dict:
    """Write ``spec.tracks`` synthetic tracks into a new catalog ``db`` tagged "by"
    ``model`` (its output layer makes the taggram); returns the planted parameters and,
    under ``_oracle_scores``, the ``(tracks, tags)`` oracle scores."""
    if db.exists():
        raise ConfigError(f"{db} exists; the benchmark writes a new catalog")
    base = load_model(model)
    d = base.tagger.cfg.embedding_dim
    out_w = base.tagger.head.weight.detach().numpy().astype(np.float64)  # (n_tags, d_model)
    # The output layer reads the CLS embedding only, not the chroma or tempo profile after it.
    out_w = np.pad(out_w, ((0, 0), (0, d - out_w.shape[1])))
    out_b = base.tagger.head.bias.detach().numpy().astype(np.float64)
    rng = np.random.default_rng(spec.seed)
    names = spec.tag_names()
    u = rng.standard_normal((spec.tags, d))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    strength = rng.uniform(*spec.strength, spec.tags)
    prevalence = rng.uniform(*spec.prevalence, spec.tags)
    offset = rng.standard_normal(d)
    offset *= spec.offset_norm / np.linalg.norm(offset)
    rotation, _ = np.linalg.qr(rng.standard_normal((d, d)))
    spread = np.arange(1, d + 1) ** -0.5
    spread *= spec.track_spread / np.sqrt(np.mean(spread**2))
    tags = tuple(base.tags)
    digest = tags_sha256(list(tags))
    setup = Setup(weights_sha256=base.weights_sha256 or "", hop_s=WINDOW_SAMPLES / SAMPLE_RATE,
                  aggregation="mean", model_name=base.name, model_source=model,
                  trained=base.trained, tags=tags, tags_sha256=digest,
                  vocabulary=vocabulary_version(list(tags)) or f"custom-{digest[:12]}",
                  embedding_dim=d)
    means = np.zeros((spec.tracks, d))
    present = np.zeros((spec.tracks, spec.tags), bool)
    windows = 0
    with Catalog(db) as catalog:
        sid = catalog.register_setup(setup).id
        for i in range(spec.tracks):
            total = round(rng.uniform(*spec.duration_s) * SAMPLE_RATE)
            valid = window_valid(total)
            n = len(valid)
            z = rng.random(spec.tags) < prevalence
            q = rng.uniform(*spec.audible, spec.tags)
            audible = z[:, None] & (rng.random((spec.tags, n)) < q[:, None])  # (tags, n)
            track = offset + rotation @ (spread * rng.standard_normal(d))
            emb = (track + (strength[:, None] * audible).T @ u
                   + spec.window_spread * rng.standard_normal((n, d)))  # (n, d)
            gram = 1 / (1 + np.exp(-(emb @ out_w.T + out_b)))  # (n, n_tags)
            share = valid / WINDOW_SAMPLES
            wemb = emb.astype(np.float16)
            catalog.put(TrackRecord(
                f"synthetic://head-bench/seed-{spec.seed}/track-{i:05d}",
                hashlib.sha256(wemb.tobytes()).hexdigest(),  # no file bytes to hash
                sid, total / SAMPLE_RATE, (share @ gram) / share.sum(),
                track_embedding(emb, valid), gram, wemb,
                {"id": f"head-bench-{i:05d}", "tags": [t for t, p in zip(names, z,
                                                                         strict=True) if p],
                 "generator": "head-bench", "seed": spec.seed}))
            means[i] = share @ emb / share.sum()
            present[i] = z
            windows += n
    # oracle: each planted direction whitened by the planted track covariance
    whiten = ((means - offset) @ rotation / spread**2) @ (rotation.T @ u.T)
    return {"tracks": spec.tracks, "windows": windows, "embedding_dim": d,
            "model": base.name, "catalog_bytes": db.stat().st_size,
            "planted": {t: {"strength": float(strength[j]), "prevalence": float(prevalence[j]),
                            "positives": int(present[:, j].sum())}
                        for j, t in enumerate(names)},
            "_oracle_scores": whiten, "_truth": present.astype(np.float32)}


@contextlib.contextmanager
def phase_clock(calls: list[dict]) -> Iterator[None]:
    """Record wall and CPU seconds of every call to the head module's phase functions
    (``depth`` 0: called by train_head itself) while the block runs."""
    saved = {name: getattr(head_mod, name) for name in _TIMED}
    depth = [0]

    def timed(name: str, fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            depth[0] += 1
            w0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1
                calls.append({"call": name, "depth": depth[0],
                              "wall_s": time.perf_counter() - w0,
                              "cpu_s": time.process_time() - c0})
        return call

    try:
        for name, fn in saved.items():
            setattr(head_mod, name, timed(name, fn))
        yield
    finally:
        for name, fn in saved.items():
            setattr(head_mod, name, fn)


def _phases(calls: list[dict], total: dict) -> dict:
    """train_head's top-level calls, named in the order it makes them."""
    names = {"read_labels": ["read_labels", "read_truth"], "score": ["score_noisy",
             "score_truth"], "fit_head": ["final_fit"], "load_windows": ["load_windows"],
             "cross_validate": ["cross_validate"], "head_checkpoint": ["checkpoint"]}
    seen: dict[str, int] = {}
    out: dict = {}
    for c in (c for c in calls if c["depth"] == 0):
        k = seen.get(c["call"], 0)
        seen[c["call"]] = k + 1
        out[names[c["call"]][k]] = {"wall_s": c["wall_s"], "cpu_s": c["cpu_s"]}
    folds = [c for c in calls if c["depth"] == 1 and c["call"] == "fit_head"]
    out["cross_validate"]["fold_fits_wall_s"] = [c["wall_s"] for c in folds]
    out["other"] = {k: total[k] - sum(v[k] for v in out.values()) for k in ("wall_s", "cpu_s")}
    return out


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _summary(score: dict) -> dict:
    return {"macro_roc_auc": score["macro_roc_auc"], "macro_pr_auc": score["macro_pr_auc"]}


def head_bench(spec: SyntheticSpec, hide: float = 0.7, flip: float = 0.1,
               cfg: head_mod.HeadConfig | None = None, model: str = "default",
               workdir: Path | None = None, threads: int | None = None) -> dict:
    """Build the synthetic catalog, write its labels, run ``train_head``; the report.

    ``workdir`` keeps the catalog, labels, truth and checkpoint (default: a temporary
    folder, removed). ``cfg`` defaults to ``train head``'s defaults with ``spec.seed``.
    ``threads``: torch's intra-op threads for the run (default: torch's own choice).
    """
    import platform

    import torch

    from rtagger.catalog.bench import machine
    from rtagger.train.evaluation.evaluate import macro_auc

    cfg = cfg or head_mod.HeadConfig(seed=spec.seed)
    with contextlib.ExitStack() as stack:
        if threads is not None:
            stack.callback(torch.set_num_threads, torch.get_num_threads())
            torch.set_num_threads(threads)
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="head-bench-")))
        workdir.mkdir(parents=True, exist_ok=True)
        db, labels, truth = workdir / "catalog.db", workdir / "labels.csv", workdir / "truth.csv"
        load_start = os.getloadavg()
        w0, c0 = time.perf_counter(), time.process_time()
        built = build_catalog(db, spec, model)
        build = {"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0}
        oracle, clean = built.pop("_oracle_scores"), built.pop("_truth")
        w0, c0 = time.perf_counter(), time.process_time()
        made = head_mod.noisy_labels(db, spec.tag_names(), hide, flip, spec.seed, labels, truth)
        label_time = {"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0}
        rss_before = _peak_rss_mib()
        calls: list[dict] = []
        w0, c0 = time.perf_counter(), time.process_time()
        with phase_clock(calls):
            report = head_mod.train_head(db, labels, workdir / "head.safetensors", cfg, truth)
        total = {"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0}
        return {
            "command": "train head-bench",
            "machine": {**machine(), "torch": torch.__version__,
                        "torch_threads": torch.get_num_threads(), "nice": os.nice(0),
                        "load_average_start": load_start, "load_average_end": os.getloadavg(),
                        "platform": platform.platform()},
            "generative_model": dataclasses.asdict(spec), "catalog": built,
            "labels": {"hide": hide, "flip": flip, **made},
            "head_config": dataclasses.asdict(cfg),
            "time": {"catalog_build": build, "labels": label_time,
                     "train_head": {**total, "phases": _phases(calls, total)}},
            "peak_rss_mib": {"after_build_and_labels": rss_before,
                             "after_train_head": _peak_rss_mib()},
            "cross_validated": {"against_noisy_labels": _summary(report["cross_validated"]),
                                "against_truth": _summary(report["against_truth"]),
                                "oracle_against_truth": {f"macro_{k}": v for k, v in
                                                         macro_auc(clean, oracle).items()}},
            "head_report": {k: v for k, v in report.items() if k != "checkpoint"},
        }
