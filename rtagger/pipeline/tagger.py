"""The tagging pipeline: PCM blocks -> ring buffer -> batched mel + model -> track context.

:meth:`Tagger.stream` is the one path; :meth:`Tagger.tag_file` and :meth:`Tagger.tag_array`
feed it decoded blocks and collect its output. Since windows depend only on their samples
(see :mod:`rtagger.model.features`) and batches are independent, any block sizes give the same
window tags as the offline run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rtagger.audio.decode import SAMPLE_RATE, WINDOW_SAMPLES, iter_audio, pcm_blocks
from rtagger.audio.ringbuffer import Window, Windower
from rtagger.engines import Engine, create_engine
from rtagger.errors import ConfigError
from rtagger.model.checkpoint import TaggingModel, load_model
from rtagger.pipeline.session import TrackSession

DEFAULT_BATCH_SIZE = 16
_ARRAY_BLOCK_SAMPLES = 1 << 16


@dataclass(frozen=True)
class WindowResult:
    index: int
    start_s: float
    end_s: float  # end of the real audio in the window
    partial: bool
    probs: np.ndarray  # (n_tags,) float32
    embedding: np.ndarray  # (d_model,) float32


@dataclass(frozen=True)
class TrackUpdate:
    """What :meth:`Tagger.stream` yields once per window, in stream order."""

    window: WindowResult
    track_probs: np.ndarray  # (n_tags,) after this window


@dataclass
class TrackResult:
    source: str
    tags: list[str]
    track_probs: np.ndarray  # (n_tags,)
    windows: list[WindowResult] = field(default_factory=list)
    aggregation: str = "mean"
    model: dict = field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        return self.windows[-1].end_s if self.windows else 0.0

    def top(self, k: int = 10) -> list[tuple[str, float]]:
        order = np.argsort(-self.track_probs, kind="stable")[:k]
        return [(self.tags[i], float(self.track_probs[i])) for i in order]

    def taggram(self) -> np.ndarray:
        """``(windows, n_tags)`` window probabilities."""
        if not self.windows:
            return np.zeros((0, len(self.tags)), np.float32)
        return np.stack([w.probs for w in self.windows])


class Tagger:
    """Tags files, arrays and streams with one model.

    ``engine`` is an engine name (see :func:`~rtagger.engines.create_engine`) or a built
    engine; None means ``torch`` for a checkpoint. An export folder (``rtagger export``)
    runs its own artefact: ``engine`` must then be None, ``auto`` or the artefact's engine
    (``onnx``, ``exported-program``, ``tensorrt``); any other name is a
    :class:`~rtagger.errors.ConfigError` that names the checkpoint inside the folder, which
    runs with any engine. ``hop_s`` is the time between window starts (default: one window,
    no overlap); ``aggregation`` is ``auto`` (the model's aggregator when it has one, else
    mean), ``mean`` or ``aggregator``.
    """

    def __init__(
        self,
        model: str | Path | TaggingModel = "default",
        *,
        engine: str | Engine | None = None,
        device: str = "cpu",
        hop_s: float | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        aggregation: str = "auto",
    ) -> None:
        if isinstance(model, str | Path) and _is_export_dir(model):
            # A deployed artefact (rtagger export): its own graph is the engine.
            from rtagger.engines.exported import load_exported_model

            self.model = load_exported_model(model)
            self.engine = (engine if engine is not None and not isinstance(engine, str)
                           else _export_engine(Path(model), engine, device))
        else:
            self.model = model if isinstance(model, TaggingModel) else load_model(model)
            if engine is None:
                engine = "torch"
            self.engine = (engine if not isinstance(engine, str)
                           else create_engine(self.model, engine, device))
        self.hop = WINDOW_SAMPLES if hop_s is None else round(hop_s * SAMPLE_RATE)
        Windower(self.hop)  # validates the hop early, with its error message
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        if aggregation not in ("auto", "mean", "aggregator"):
            raise ConfigError(f"aggregation must be auto, mean or aggregator, got "
                              f"{aggregation!r}")
        if aggregation == "aggregator" and self.model.aggregator is None:
            raise ConfigError(f"model {self.model.name} has no context aggregator")
        self.aggregation = aggregation

    @property
    def tags(self) -> list[str]:
        return self.model.tags

    def new_session(self, *, sample_rate: int = SAMPLE_RATE, channels: int = 1,
                    source: str = "<stream>") -> TrackSession:
        """A fresh :class:`TrackSession` with this tagger's hop and aggregation."""
        agg = None if self.aggregation == "mean" else self.model.aggregator
        return TrackSession(self.tags, agg, sample_rate=sample_rate, channels=channels,
                            hop=self.hop, source=source,
                            segment_dims=self.model.tagger.cfg.d_model)

    def run_windows(self, windows: list[Window]) -> list[WindowResult]:
        """Tag a batch of windows (any number; split into engine batches)."""
        results: list[WindowResult] = []
        for i in range(0, len(windows), self.batch_size):
            chunk = windows[i : i + self.batch_size]
            probs, embs = self.engine.run(np.stack([w.samples for w in chunk]))
            results.extend(
                WindowResult(w.index, w.start_s, w.end_s, w.partial, p, e)
                for w, p, e in zip(chunk, probs, embs, strict=True)
            )
        return results

    def stream(
        self,
        blocks: Iterable[np.ndarray],
        *,
        sample_rate: int = SAMPLE_RATE,
        channels: int = 1,
        low_latency: bool = False,
        source: str = "<stream>",
    ) -> Iterator[TrackUpdate]:
        """Tag a stream of PCM blocks; yield one update per window, in order.

        Blocks are float or int16 arrays at ``sample_rate`` with ``channels`` channels
        (``(channels, n)`` or interleaved). With ``low_latency``, windows are tagged as soon
        as a block completes them; otherwise they are batched for throughput.
        """
        session = self.new_session(sample_rate=sample_rate, channels=channels, source=source)
        pending: list[Window] = []
        for block in blocks:
            pending.extend(session.push(block))
            if len(pending) >= self.batch_size or (low_latency and pending):
                yield from self._updates(pending, session)
                pending = []
        pending.extend(session.finish())
        yield from self._updates(pending, session)

    def _updates(self, windows: list[Window], session: TrackSession) -> Iterator[TrackUpdate]:
        for w, r in zip(windows, self.run_windows(windows), strict=True):
            session.add(w, r.probs, r.embedding)
            yield TrackUpdate(r, session.context.track_probs())

    def tag_blocks(
        self,
        blocks: Iterable[np.ndarray],
        source: str,
        on_window: Callable[[WindowResult], None] | None = None,
        **stream_kwargs,
    ) -> TrackResult:
        windows: list[WindowResult] = []
        track = np.zeros(len(self.tags), np.float32)
        for update in self.stream(blocks, source=source, **stream_kwargs):
            windows.append(update.window)
            track = update.track_probs
            if on_window is not None:
                on_window(update.window)
        return TrackResult(source, list(self.tags), track, windows,
                           aggregation=self.new_session().context.method, model=self.model_info())

    def tag_file(self, path: str | Path,
                 on_window: Callable[[WindowResult], None] | None = None) -> TrackResult:
        """Decode and tag a whole file or URL."""
        return self.tag_blocks(iter_audio(path), str(path), on_window)

    def tag_array(self, samples: np.ndarray, sample_rate: int = SAMPLE_RATE,
                  source: str = "<array>") -> TrackResult:
        """Tag an in-memory mono signal."""
        blocks = pcm_blocks(np.asarray(samples), _ARRAY_BLOCK_SAMPLES)
        return self.tag_blocks(blocks, source, sample_rate=sample_rate)

    def model_info(self) -> dict:
        m = self.model
        info = {"name": m.name, "trained": m.trained, "source": m.source,
                "weights_sha256": m.weights_sha256, "engine": self.engine.name,
                "device": self.engine.device, "hop_s": self.hop / SAMPLE_RATE}
        reason = getattr(self.engine, "fallback_reason", None)
        if reason:
            info["engine_fallback"] = reason  # reported, never silent
        return info


def _export_engine(folder: Path, engine: str | None, device: str) -> Engine:
    """The engine of export ``folder``; refuses an ``engine`` the folder does not hold."""
    from rtagger.engines.exported import CHECKPOINT, load_exported, read_manifest

    artifact = read_manifest(folder)["artifact"]
    if engine not in (None, "auto", artifact):
        raise ConfigError(f"{folder} is an {artifact} export: it runs its own {artifact} "
                          f"graph, so engine {engine!r} cannot apply; use engine auto (or "
                          f"{artifact}), or pass the checkpoint inside it "
                          f"({folder / CHECKPOINT}) to run engine {engine!r}")
    return load_exported(folder, device)[0]


def _is_export_dir(path: str | Path) -> bool:
    if not Path(path).is_dir():
        return False
    from rtagger.engines.exported import is_export_dir

    return is_export_dir(path)
