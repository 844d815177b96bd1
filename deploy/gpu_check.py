"""GPU check: one prepared run that measures the GPU path and writes a JSON + Markdown report.

``python -m rtagger.deploy.gpu_check --device cuda --out DIR`` (or ``deploy/gpu_check.sh
DIR``) fits a short device lease (default ``--budget-s 420``, under 8 minutes in all) and
measures, section by section:

- ``machine``: GPU, driver, CUDA, cuDNN, torch, CPU;
- ``parity``: max |delta prob| and |delta embedding| of the torch engine on the device against
  eager fp32 on the CPU, on generated music-like windows, for fp32/fp16/bf16 with and
  without CUDA graphs, per model size (small = the shipped default, and large, the paper's
  teacher size, untrained);
- ``latency``: p50/p95/p99 of one ``Engine.run`` call and windows/s for batch 1...1024, per
  size and engine variant (fp32, fp16, fp16 + CUDA graphs);
- ``streams``: the live path, N simulated streams through
  :class:`~rtagger.pipeline.worker.InferenceWorker` at hop 1 s (one window per stream per second,
  paced to the wall clock, each followed by its track-context aggregation as in the
  server), N doubling until the update p99 passes 50 ms or a cap;
- ``training``: windows/s of :func:`rtagger.train.fit.loop.train` (AMP on CUDA, the recipes'
  augmentation) for the teacher and student recipes on random windows, a few steps;
- ``tensorrt``: attempted when ``torch_tensorrt`` imports, else unavailable with the reason.

Every section catches its own errors and records them (type, message, traceback), so one
failing section never loses the others; the report is rewritten atomically after each
section, so a run killed at its time limit still leaves what it measured. ``--budget-s``
scales every per-point budget. ``--device cpu --quick`` runs the same code on the debug
size in seconds (CI); GPU-only variants are then reported unavailable with the reason.

Needs only torch, numpy and safetensors beside rtagger (no websockets, PyAV, sound devices):
what a bare GPU image has.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from rtagger.atomic import atomic_write
from rtagger.audio.decode import DEFAULT_LIVE_HOP_S, WINDOW_S, WINDOW_SAMPLES
from rtagger.audio.signals import music_windows
from rtagger.bench.throughput import machine_info
from rtagger.engines import create_engine, unavailable_reason
from rtagger.model.checkpoint import TaggingModel, build_untrained, load_model
from rtagger.pipeline.aggregate import TrackContext
from rtagger.pipeline.worker import InferenceWorker, Overloaded

log = logging.getLogger(__name__)

REPORT_VERSION = 1
REPORT_NAME = "gpu-check"
STREAM_P99_LIMIT_MS = 50.0
PARITY_BATCH = 12  # padded to the captured 16 in the CUDA-graph variants
PARITY_GRAPH_SIZES = (1, 16)
# Share of --budget-s per section; what a section leaves unused is not carried over.
SHARES = {"parity": 0.08, "latency": 0.45, "streams": 0.22, "training": 0.12,
          "tensorrt": 0.13}
# (precision, CUDA graphs): the engine variants measured.
PARITY_VARIANTS = (("fp32", False), ("fp32", True), ("fp16", False), ("fp16", True),
                   ("bf16", False))
LATENCY_VARIANTS = (("fp32", False), ("fp16", False), ("fp16", True))


class Unavailable(Exception):
    """A section (or variant) that cannot run here; the message is the reason."""


@dataclass(frozen=True)
class CheckSettings:
    device: str = "cuda"
    out: str = "gpu-check"
    budget_s: float = 420.0
    quick: bool = False
    max_streams: int = 4096

    @property
    def sizes(self) -> tuple[str, ...]:
        return ("debug",) if self.quick else ("small", "large")

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        return (1, 2, 4) if self.quick else tuple(2**k for k in range(11))  # 1..1024

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")


# --- report ---------------------------------------------------------------------------------


class Report:
    """The JSON document and its Markdown rendering, rewritten atomically after each section."""

    def __init__(self, settings: CheckSettings) -> None:
        self.dir = Path(settings.out)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.json_path = self.dir / f"{REPORT_NAME}.json"
        self.md_path = self.dir / f"{REPORT_NAME}.md"
        self.data: dict = {
            "report_version": REPORT_VERSION,
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "settings": asdict(settings), "finished": False, "sections": {},
        }

    def write(self) -> None:
        atomic_write(self.json_path, json.dumps(self.data, indent=2) + "\n")
        atomic_write(self.md_path, render_markdown(self.data))


def run_section(report: Report, name: str, fn: Callable[[float], dict],
                deadline: float) -> dict:
    """Run one section with its own deadline; record its result or why it has none."""
    t0 = time.perf_counter()
    log.info("gpu check: %s ...", name)
    if t0 >= deadline:
        entry = {"status": "skipped", "reason": "the run's time budget (--budget-s) is spent"}
    else:
        try:
            entry = {"status": "ok", **fn(deadline)}
        except Unavailable as e:
            entry = {"status": "unavailable", "reason": str(e)}
        except Exception as e:  # a section's failure is a result; the others still run
            log.exception("gpu check section %s failed", name)
            entry = {"status": "error", "error": f"{type(e).__name__}: {e}",
                     "traceback": traceback.format_exc()}
    entry["elapsed_s"] = round(time.perf_counter() - t0, 2)
    report.data["sections"][name] = entry
    report.write()
    log.info("gpu check: %s %s in %.1f s", name, entry["status"], entry["elapsed_s"])
    _release()
    return entry


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _need_device(settings: CheckSettings) -> None:
    if settings.on_cuda and not torch.cuda.is_available():
        raise Unavailable(f"device {settings.device!r} requested but CUDA is not available")


# --- sections -------------------------------------------------------------------------------


def machine_section(settings: CheckSettings) -> dict:
    """GPU name and memory, driver, CUDA, cuDNN and torch versions, CPU."""
    info = machine_info(settings.device)
    info["cuda_available"] = torch.cuda.is_available()
    if settings.on_cuda and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(settings.device))
        info.update({"gpu_memory_gib": round(props.total_memory / 2**30, 1),
                     "gpu_multiprocessors": props.multi_processor_count,
                     "gpu_capability": f"{props.major}.{props.minor}",
                     "cudnn": torch.backends.cudnn.version(),
                     "driver": _driver_version()})
    return info


def _driver_version() -> str:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "unknown (no nvidia-smi on PATH)"
    try:
        done = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        return f"unknown (nvidia-smi failed: {e})"
    return done.stdout.strip().splitlines()[0] if done.stdout.strip() else "unknown"


def load_size(size: str) -> TaggingModel:
    """The model measured for a size: the shipped default for ``small``, else untrained."""
    if size == "small":
        try:
            model = load_model("default")
            student = build_untrained("small").tagger.cfg
            # Dropout and stochastic depth are training settings, not the architecture.
            if replace(model.tagger.cfg, dropout=0.0, drop_path=0.0) == replace(
                    student, dropout=0.0, drop_path=0.0):
                return model
            log.warning("the default model is not the small size; using untrained:small")
        except Exception as e:  # weights only change parity, never the timings
            log.warning("default model not loadable (%s); using untrained:small", e)
    return build_untrained(size)


def _model_info(model: TaggingModel) -> dict:
    return {"model": model.name, "trained": model.trained,
            "tagger_params": sum(p.numel() for p in model.tagger.parameters())}


def _engine_options(precision: str, graphs: tuple[int, ...]) -> dict:
    opts: dict = {}
    if precision != "fp32":
        opts["precision"] = precision
    if graphs:
        opts["cuda_graph_batch_sizes"] = graphs
    return opts


def _variant_name(precision: str, graphs: bool) -> str:
    return precision + (" + CUDA graphs" if graphs else "")


def parity_section(settings: CheckSettings, deadline: float) -> dict:
    """Max |delta| of each device variant against eager fp32 on the CPU, per size."""
    _need_device(settings)
    windows = music_windows(PARITY_BATCH, seed=1)
    results = []
    for size in settings.sizes:
        model = load_size(size)
        reference = create_engine(model, "torch", "cpu", optimize=False)
        ref_p, ref_e = reference.run(windows)
        ref_p1, ref_e1 = reference.run(windows[:1])
        del reference
        for precision, graphs in PARITY_VARIANTS:
            row = {"size": size, **_model_info(model),
                   "variant": _variant_name(precision, graphs), "device": settings.device}
            if not settings.on_cuda and (precision != "fp32" or graphs):
                results.append({**row, "status": "unavailable",
                                "reason": "needs a CUDA device (the CPU path runs fp32, "
                                          "without CUDA graphs)"})
                continue
            if time.perf_counter() >= deadline:
                results.append({**row, "status": "skipped", "reason": "section budget spent"})
                continue
            try:
                engine = create_engine(model, "torch", settings.device, **_engine_options(
                    precision, PARITY_GRAPH_SIZES if graphs else ()))
                p, e = engine.run(windows)
                p1, e1 = engine.run(windows[:1])  # batch 1: its own graph, no padding
                row.update({
                    "status": "ok", "windows": PARITY_BATCH + 1,
                    "max_abs_dprob": _max_abs(np.concatenate([p - ref_p, p1 - ref_p1])),
                    "mean_abs_dprob": float(np.mean(np.abs(p - ref_p))),
                    "max_abs_demb": _max_abs(np.concatenate([e - ref_e, e1 - ref_e1])),
                    "prob_range": [float(ref_p.min()), float(ref_p.max())],
                })
                del engine
            except Exception as e:  # one variant failing must not hide the others
                log.exception("parity %s %s failed", size, row["variant"])
                row.update({"status": "error", "error": f"{type(e).__name__}: {e}"})
            results.append(row)
            _release()
    return {"reference": "torch engine, fp32, eager (no BatchNorm folding), CPU",
            "signal": "music_windows (drums, bass, chords; -20..-1 dBFS peaks)",
            "results": results}


def _max_abs(d: np.ndarray) -> float:
    return float(np.max(np.abs(d))) if np.all(np.isfinite(d)) else math.inf


def time_engine(engine, windows: np.ndarray, warmup_s: float, budget_s: float,
                min_iters: int = 3, max_iters: int = 20_000) -> dict:
    """Latency of ``engine.run(windows)`` (CUDA events on a GPU) and windows/s.

    Warm-up calls first (at least 2, ``warmup_s``), then timed calls until ``budget_s`` is
    spent, at least ``min_iters``. Percentiles in milliseconds.
    """
    cuda = str(engine.device).startswith("cuda")
    warm_end = time.perf_counter() + warmup_s
    for i in range(1000):
        engine.run(windows)
        if i >= 1 and time.perf_counter() >= warm_end:
            break
    times: list[float] = []
    end = time.perf_counter() + budget_s
    while len(times) < max_iters and (len(times) < min_iters or time.perf_counter() < end):
        if cuda:
            start_ev = torch.cuda.Event(enable_timing=True)
            end_ev = torch.cuda.Event(enable_timing=True)
            start_ev.record()
            engine.run(windows)
            end_ev.record()
            end_ev.synchronize()
            times.append(start_ev.elapsed_time(end_ev) / 1000.0)
        else:
            t0 = time.perf_counter()
            engine.run(windows)
            times.append(time.perf_counter() - t0)
    t = np.asarray(times)
    p50, p95, p99 = np.percentile(t, [50, 95, 99]) * 1000.0
    return {"calls": len(t), "p50_ms": round(float(p50), 4), "p95_ms": round(float(p95), 4),
            "p99_ms": round(float(p99), 4), "p99_reliable": len(t) >= 100,
            "windows_per_s": round(len(windows) * len(t) / float(t.sum()), 1),
            "clock": "cuda-events" if cuda else "perf_counter"}


def latency_section(settings: CheckSettings, deadline: float) -> dict:
    """p50/p95/p99 and windows/s per size, engine variant and batch size."""
    _need_device(settings)
    variants = LATENCY_VARIANTS if settings.on_cuda else (("fp32", False),)
    batches = settings.batch_sizes
    points = len(settings.sizes) * len(variants) * len(batches)
    per_point = max(0.05, (deadline - time.perf_counter()) / points)
    if settings.quick:
        per_point = min(per_point, 0.3)
    pool = music_windows(16, seed=2)
    results = []
    for size in settings.sizes:
        model = load_size(size)
        for precision, graphs in variants:
            eager = None if graphs else create_engine(
                model, "torch", settings.device, **_engine_options(precision, ()))
            for b in batches:
                row = {"size": size, "variant": _variant_name(precision, graphs), "batch": b}
                if time.perf_counter() >= deadline:
                    results.append({**row, "status": "skipped",
                                    "reason": "section budget spent"})
                    continue
                try:
                    # One graph per engine: captured graphs keep their memory while alive.
                    engine = eager if eager is not None else create_engine(
                        model, "torch", settings.device, **_engine_options(precision, (b,)))
                    windows = pool[np.arange(b) % len(pool)]
                    # 25% of the point left for building the engine (and graph capture).
                    row.update(status="ok", **time_engine(engine, windows, 0.15 * per_point,
                                                          0.6 * per_point))
                    row["x_realtime"] = round(row["windows_per_s"] * WINDOW_S, 1)
                    if engine is not eager:
                        del engine
                except Exception as e:  # e.g. out of memory at a large batch
                    log.exception("latency %s %s batch %d failed", size, row["variant"], b)
                    row.update(status="error", error=f"{type(e).__name__}: {e}")
                    _release()
                results.append(row)
            del eager
            _release()
    return {"per_point_budget_s": round(per_point, 3), "results": results,
            "note": "one Engine.run call on a batch (numpy in, numpy out, log-mel included)"}


class _Stream:
    """One simulated live stream: its track context, guarded against the two callers."""

    def __init__(self, model: TaggingModel) -> None:
        self.context = TrackContext(len(model.tags), model.aggregator)
        self.lock = threading.Lock()


def _stream_round(worker: InferenceWorker, model: TaggingModel, pool: np.ndarray,
                  n_streams: int, seconds: float, hop_s: float) -> dict:
    """``n_streams`` paced streams for ``seconds``: update latency from window complete."""
    streams = [_Stream(model) for _ in range(n_streams)]
    per_stream = max(1, int(seconds / hop_s))
    # Start times spread over one hop, as real streams are; a single pacing thread submits
    # every window at its due time (threads per stream would cost more than the worker).
    due = sorted((i * hop_s / n_streams + k * hop_s, i) for i in range(n_streams)
                 for k in range(per_stream))
    tag_ms: list[float] = []
    update_ms: list[float] = []
    counts = {"dropped": 0, "errors": 0}
    done = threading.Semaphore(0)
    record = threading.Lock()

    def finish(ms: float | None = None, failed: str = "") -> None:
        with record:
            if failed:
                counts[failed] += 1
            else:
                update_ms.append(ms)
        done.release()

    def since(t_due: float) -> float:
        return (time.perf_counter() - t_due) * 1000

    def on_tagged(s: _Stream, t_due: float, fut) -> None:
        if fut.exception() is not None:
            return finish(failed="errors")
        with record:
            tag_ms.append(since(t_due))
        probs, embs = fut.result()
        with s.lock:
            s.context.add(probs[0], embs[0])
            ctx = s.context.context()
        if ctx is None:  # mean pooling: the update is ready now
            return finish(since(t_due))
        try:
            agg = worker.aggregate([ctx])
        except Overloaded:
            return finish(failed="dropped")
        agg.add_done_callback(lambda f: finish(failed="errors") if f.exception() is not None
                              else finish(since(t_due)))

    t0 = time.perf_counter() + 0.05
    for j, (offset, i) in enumerate(due):
        t_due = t0 + offset
        wait = t_due - time.perf_counter()
        if wait > 0:
            time.sleep(wait)  # pacing to the due time, not polling
        try:
            fut = worker.tag([pool[j % len(pool)]])
        except Overloaded:  # the server drops a live stream's window here, and says so
            finish(failed="dropped")
            continue
        fut.add_done_callback(lambda f, s=streams[i], t=t_due: on_tagged(s, t, f))
    drained = all(done.acquire(timeout=10) for _ in due)
    wall = time.perf_counter() - t0
    lat = np.asarray(update_ms) if update_ms else np.asarray([math.inf])
    p50, p95, p99 = np.percentile(lat, [50, 95, 99])
    return {"streams": n_streams, "seconds": round(per_stream * hop_s, 1),
            "windows": len(due), "updates": len(update_ms), **counts,
            "drained": drained, "update_p50_ms": round(float(p50), 3),
            "update_p95_ms": round(float(p95), 3), "update_p99_ms": round(float(p99), 3),
            "tag_p99_ms": round(float(np.percentile(tag_ms, 99)), 3) if tag_ms else None,
            "p99_reliable": len(update_ms) >= 100, "wall_s": round(wall, 2)}


def streams_section(settings: CheckSettings, deadline: float) -> dict:
    """The live path: N paced streams through one worker, N doubling to the 50 ms p99."""
    _need_device(settings)
    size = "debug" if settings.quick else "small"
    model = load_size(size)
    engine = create_engine(model, "torch", settings.device)
    worker = InferenceWorker(engine, model.aggregator)  # the server's defaults
    pool = music_windows(8, seed=3)
    # cuFFT plans and kernel choices are made per batch size: not inside the timed rounds.
    for b in range(1, (4 if settings.quick else worker.max_batch) + 1):
        engine.run(pool[np.arange(b) % len(pool)])
    cap = 2 if settings.quick else settings.max_streams
    start_n = 1 if settings.quick else 4
    rounds = max(1, int(math.log2(cap / start_n)) + 1)
    seconds = 2.0 if settings.quick else min(10.0, max(
        2.0, 0.8 * (deadline - time.perf_counter()) / rounds - 1.0))
    results, stopped = [], "cap reached"
    try:
        n = start_n
        while n <= cap:
            if time.perf_counter() + seconds >= deadline:
                stopped = "section budget spent"
                break
            before = asdict(worker.stats)
            worker.stats.batch_sizes.clear()  # the worker is idle between rounds
            row = _stream_round(worker, model, pool, n, seconds, DEFAULT_LIVE_HOP_S)
            after = worker.stats
            row["worker_busy_share"] = round((after.busy_s - before["busy_s"])
                                             / max(row["wall_s"], 1e-9), 3)
            sizes = after.batch_sizes  # window batches of this round (the last 1,000)
            row["mean_tag_batch"] = round(float(np.mean(sizes)), 2) if sizes else None
            results.append(row)
            log.info("streams %d: update p99 %.1f ms", n, row["update_p99_ms"])
            if row["update_p99_ms"] > STREAM_P99_LIMIT_MS or not row["drained"]:
                stopped = f"update p99 passed {STREAM_P99_LIMIT_MS:.0f} ms"
                break
            n *= 2
    finally:
        worker.close()
    ok = [r["streams"] for r in results if r["update_p99_ms"] <= STREAM_P99_LIMIT_MS]
    return {"size": size, **_model_info(model), "engine": engine.describe(),
            "hop_s": DEFAULT_LIVE_HOP_S, "max_batch": worker.max_batch,
            "max_wait_s": worker.max_wait_s, "p99_limit_ms": STREAM_P99_LIMIT_MS,
            "latency": "window due -> its track aggregation resolved (an update's inputs)",
            "max_streams_within_limit": max(ok) if ok else 0, "stopped": stopped,
            "results": results}


class RandomWindowsTask:
    """A tagger stage on random windows for :func:`rtagger.train.fit.loop.train`: speed only.

    The model and the augmentation come from the recipe as in
    :class:`rtagger.train.fit.tasks.TaggerTask`; batches are slices of a pool made once, so the
    loop's own cost (host-to-device copy, augmentation, forward, backward, AdamW) is what
    is timed, not random-number generation.
    """

    def __init__(self, recipe, n_tags: int = 50, pool_batches: int = 2) -> None:
        from rtagger.model.network import ChunkTagger, tagger_config
        from rtagger.train.fit.augment import augmenters

        m = recipe.model
        self.model = ChunkTagger(tagger_config(m.size, n_tags, dropout=m.dropout,
                                               drop_path=m.drop_path, **m.arch))
        self.tags = [f"tag{i}" for i in range(n_tags)]
        self.augment, self.spec_mask = augmenters(recipe.augment)
        rng = np.random.default_rng(0)
        b = recipe.optim.batch_size
        self.waves = (0.1 * rng.standard_normal((pool_batches * b, WINDOW_SAMPLES))
                      ).astype(np.float32)
        self.targets = (rng.random((pool_batches * b, n_tags)) < 0.1).astype(np.float32)

    def batch(self, rng: np.random.Generator, n: int) -> tuple:
        i = int(rng.integers(0, len(self.waves) // n)) * n
        return torch.from_numpy(self.waves[i : i + n]), torch.from_numpy(self.targets[i : i + n])

    def loss_inputs(self, model, waves: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        from rtagger.train.fit.augment import augmented_logits

        return augmented_logits(model, waves, gen, self.augment, self.spec_mask)

    def evaluate(self, model, device: torch.device) -> dict:
        x = torch.from_numpy(self.waves[:4]).to(device)
        logits, _ = model(x)
        y = torch.from_numpy(self.targets[:4]).to(device)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), y)
        return {"neg_bce": -float(loss)}

    def export(self, model, metrics: dict) -> TaggingModel:
        import copy

        return TaggingModel(copy.deepcopy(model).cpu().eval(), None, self.tags,
                            name="gpu-check-speed", trained=False)


def training_section(settings: CheckSettings, deadline: float) -> dict:
    """Windows/s of the project's training loop for the teacher and student recipes."""
    _need_device(settings)
    from rtagger.train.fit.loop import train
    from rtagger.train.fit.recipe import load_recipe

    recipes = resources.files("rtagger.train") / "recipes"
    plan = [("small", "student.toml"), ("large", "teacher.toml")]
    if settings.quick:
        plan = [("debug", "student.toml")]
    warm, timed = (1, 2) if settings.quick else (5, 20)
    results = []
    for size, file in plan:
        row: dict = {"size": size, "recipe": file}
        if time.perf_counter() >= deadline:
            results.append({**row, "status": "skipped", "reason": "section budget spent"})
            continue
        try:
            with resources.as_file(recipes / file) as path:
                recipe = load_recipe(path)
            batch = 2 if settings.quick else recipe.optim.batch_size
            recipe = replace(
                recipe, name=f"gpu-check-{size}",
                model=replace(recipe.model, size=size, init=None),
                optim=replace(recipe.optim, batch_size=batch, max_steps=warm + timed,
                              warmup_steps=1),
                eval=replace(recipe.eval, every_steps=warm, metric="neg_bce", patience=100))
            task = RandomWindowsTask(recipe)
            if settings.on_cuda:
                torch.cuda.reset_peak_memory_stats(torch.device(settings.device))
            with tempfile.TemporaryDirectory(prefix="gpu-check-train-") as tmp:
                t0 = time.perf_counter()
                train(task, recipe, tmp, progress=False, device=settings.device)
                wall = time.perf_counter() - t0
                history = json.loads((Path(tmp) / "history.json").read_text())["history"]
            row.update({
                "status": "ok", "batch": batch, "amp": recipe.optim.amp and settings.on_cuda,
                "augment": task.augment is not None, "warmup_steps": warm,
                "timed_steps": timed,
                # The loop's own figure for the steps after the warm-up interval.
                "windows_per_s": history[-1]["train_windows_per_s"],
                "first_interval_windows_per_s": history[0]["train_windows_per_s"],
                "wall_s": round(wall, 2),
            })
            row["windows_per_gpu_hour"] = round(row["windows_per_s"] * 3600)
            if settings.on_cuda:
                row["peak_memory_gib"] = round(
                    torch.cuda.max_memory_allocated(torch.device(settings.device)) / 2**30, 2)
        except Exception as e:
            log.exception("training %s failed", size)
            row.update({"status": "error", "error": f"{type(e).__name__}: {e}"})
        results.append(row)
        _release()
    return {"loop": "rtagger.train.fit.loop.train (AdamW, grad clip, AMP fp16 on CUDA)",
            "data": "random windows from a pool in memory (no feature cache)",
            "results": results}


def tensorrt_section(settings: CheckSettings, deadline: float) -> dict:
    """The TensorRT engine, when torch_tensorrt imports: build, parity, latency."""
    reason = unavailable_reason("tensorrt", settings.device)
    if reason is not None:
        raise Unavailable(reason)
    size = "debug" if settings.quick else "small"
    model = load_size(size)
    t0 = time.perf_counter()
    engine = create_engine(model, "tensorrt", settings.device, max_batch=64, opt_batch=16,
                           cache_dir=Path(settings.out) / "tensorrt-cache")
    build_s = round(time.perf_counter() - t0, 1)
    if engine.name != "tensorrt":
        return {"built": False, "reason": engine.fallback_reason, "build_s": build_s}
    windows = music_windows(PARITY_BATCH, seed=1)
    ref_p, ref_e = create_engine(model, "torch", "cpu", optimize=False).run(windows)
    p, e = engine.run(windows)
    left = max(0.3, deadline - time.perf_counter())
    latency = [{"batch": b, **time_engine(engine, windows[np.arange(b) % len(windows)],
                                          0.05 * left, 0.2 * left)} for b in (1, 16, 64)]
    return {"built": True, "build_s": build_s, "size": size, **_model_info(model),
            "engine": engine.describe(), "max_abs_dprob": _max_abs(p - ref_p),
            "max_abs_demb": _max_abs(e - ref_e), "latency": latency}


SECTIONS: dict[str, Callable[[CheckSettings, float], dict]] = {
    "parity": parity_section, "latency": latency_section, "streams": streams_section,
    "training": training_section, "tensorrt": tensorrt_section,
}


def run_check(settings: CheckSettings) -> dict:
    """Run every section within ``settings.budget_s``; return the report (also on disk)."""
    report = Report(settings)
    started = time.perf_counter()
    end = started + settings.budget_s
    run_section(report, "machine", lambda _deadline: machine_section(settings), end)
    for name, fn in SECTIONS.items():
        now = time.perf_counter()
        deadline = min(end, now + SHARES[name] * settings.budget_s)
        run_section(report, name, lambda d, fn=fn: fn(settings, d), deadline)
    report.data["finished"] = True
    report.data["duration_s"] = round(time.perf_counter() - started, 1)
    report.write()
    return report.data


# --- Markdown ---------------------------------------------------------------------------------


def _table(rows: list[dict], cols: list[str]) -> list[str]:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            if isinstance(v, float):
                cells.append(f"{v:.0f}" if abs(v) >= 1000 else f"{v:.3g}")
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_markdown(data: dict) -> str:
    """The report as Markdown: one heading per section, a table per measurement."""
    s = data["settings"]
    out = [f"# rtagger GPU check ({s['device']}{', quick' if s['quick'] else ''})", "",
           f"Started {data['started_utc']}, budget {s['budget_s']:.0f} s"
           + (f", took {data['duration_s']} s." if data.get("finished") else
              " (unfinished: partial results)."), ""]
    cols = {
        "parity": ["size", "model", "variant", "status", "max_abs_dprob", "mean_abs_dprob",
                   "max_abs_demb"],
        "latency": ["size", "variant", "batch", "status", "p50_ms", "p95_ms", "p99_ms",
                    "windows_per_s", "x_realtime", "calls"],
        "streams": ["streams", "windows", "updates", "dropped", "update_p50_ms",
                    "update_p99_ms", "tag_p99_ms", "worker_busy_share", "mean_tag_batch"],
        "training": ["size", "batch", "status", "amp", "windows_per_s", "windows_per_gpu_hour",
                     "peak_memory_gib", "wall_s"],
    }
    for name, sec in data["sections"].items():
        out += [f"## {name}", "", f"Status: **{sec['status']}** ({sec['elapsed_s']} s)", ""]
        if sec["status"] != "ok":
            out += [f"Reason: {sec.get('reason') or sec.get('error')}", ""]
            continue
        if name == "machine":
            out += [f"- {k}: {v}" for k, v in sec.items() if k not in ("status", "elapsed_s")]
        elif name == "tensorrt":
            out += [f"- {k}: {v}" for k, v in sec.items()
                    if k not in ("status", "elapsed_s", "latency")]
            out += ["", *_table(sec.get("latency", []),
                                ["batch", "p50_ms", "p95_ms", "p99_ms", "windows_per_s"])]
        else:
            notes = {k: v for k, v in sec.items()
                     if k not in ("status", "elapsed_s", "results", "engine")}
            out += [f"- {k}: {v}" for k, v in notes.items()] + [""]
            rows = sec.get("results", [])
            if rows and name in cols:
                out += _table(rows, cols[name])
            out += [f"- {r.get('size', '')} {r.get('variant', '')}: {r['status']} "
                    f"({r.get('reason') or r.get('error')})"
                    for r in rows if r.get("status") not in (None, "ok")]
        out.append("")
    return "\n".join(out) + "\n"


# --- command line -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m rtagger.deploy.gpu_check``; exit 1 when a section failed with an error."""
    parser = argparse.ArgumentParser(prog="python -m rtagger.deploy.gpu_check",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--out", default="gpu-check", help="folder for the reports")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="time budget of all sections together (default 420; 60 with "
                             "--quick)")
    parser.add_argument("--quick", action="store_true",
                        help="debug size, tiny batches, two streams: seconds, for CI")
    parser.add_argument("--max-streams", type=int, default=4096)
    args = parser.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 60.0 if args.quick else 420.0
    if args.budget_s <= 0 or args.max_streams < 1:
        parser.error("--budget-s must be > 0 and --max-streams >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    settings = CheckSettings(device=args.device, out=args.out, budget_s=args.budget_s,
                             quick=args.quick, max_streams=args.max_streams)
    data = run_check(settings)
    for name, sec in data["sections"].items():
        print(f"{name}: {sec['status']} ({sec['elapsed_s']} s)"
              + (f": {sec.get('reason') or sec.get('error')}" if sec["status"] != "ok" else ""))
    print(f"report: {Path(settings.out) / REPORT_NAME}.json and .md")
    return 1 if any(s["status"] == "error" for s in data["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
