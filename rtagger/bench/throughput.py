"""``rtagger bench``: how fast each engine tags, side by side, in one run.

For every engine available on the device (or those asked for) and every batch size:

- latency of one ``Engine.run`` call on a batch of windows (p50/p95/p99): warm-up first,
  then calls until ``budget_s`` is spent (at least ``min_iters``, at most ``max_iters``).
  Timed with ``time.perf_counter`` on CPU and CUDA events on GPU. Every window in a batch
  waits for the whole call, so this is also the window latency at that batch size.
- throughput: windows/s and times real time (offline hop = window: one window is
  :data:`~rtagger.audio.decode.WINDOW_S` = 3.69 s of audio);
- offline file tagging: :class:`~rtagger.pipeline.tagger.Tagger` on a generated ~60 s signal with
  hop = window, end to end (windowing, engine, track context), as times real time (median
  of the runs that fit in ``budget_s``).

The report (:func:`run_bench`) is a JSON-able dict with the machine description (CPU model,
cores, load average, GPU, library versions, thread count); :func:`results_table` renders it.
The end-to-end figure with N simulated real-time streams (``--streams N``) is
:func:`bench_streams`: a real server process and N paced clients on loopback. Timings on a
shared machine move with its load: the report records the load average so runs can be
compared honestly.
"""

from __future__ import annotations

import gc
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from rtagger.audio.decode import DEFAULT_LIVE_HOP_S, SAMPLE_RATE, WINDOW_S, WINDOW_SAMPLES
from rtagger.audio.signals import music_like
from rtagger.engines import ENGINES, available_engines, create_engine, unavailable_reason
from rtagger.errors import ConfigError, EngineUnavailable, RtaggerError
from rtagger.machine import cpu_model
from rtagger.model.checkpoint import TaggingModel, load_model

log = logging.getLogger(__name__)

REPORT_VERSION = 1
DEFAULT_BATCH_SIZES = (1, 8, 64)
P99_MIN_SAMPLES = 100  # fewer timed calls than this: the p99 is flagged as unreliable


@dataclass(frozen=True)
class BenchSettings:
    """What to measure. Defaults give stable p99s for batch 1 and 8 in ~1-2 min per engine."""

    model: str = "default"
    engines: tuple[str, ...] = ()  # () = every engine available on the device
    device: str = "cpu"
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    warmup_s: float = 1.0  # per (engine, batch), at least 2 calls
    budget_s: float = 10.0  # timed calls per (engine, batch)
    min_iters: int = 20
    max_iters: int = 2000
    offline_s: float = 60.0  # length of the generated signal tagged offline
    threads: int | None = None  # intra-op threads (torch and ONNX Runtime)
    quick: bool = False
    streams: int = 0  # > 0: also the end-to-end figure with this many real-time streams
    stream_s: float = 30.0  # audio seconds each stream plays
    stream_engine: str = "auto"  # engine of the server process
    stream_url: str | None = None  # a running server (e.g. on another host) instead of one here

    def __post_init__(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ConfigError(f"batch sizes must be >= 1, got {self.batch_sizes}")
        if self.budget_s <= 0 or self.warmup_s < 0 or self.offline_s < WINDOW_S:
            raise ConfigError("budget_s must be > 0, warmup_s >= 0 and offline_s >= one "
                              f"window ({WINDOW_S:.2f} s)")
        if not 1 <= self.min_iters <= self.max_iters:
            raise ConfigError(f"need 1 <= min_iters <= max_iters, got {self.min_iters}, "
                              f"{self.max_iters}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        unknown = set(self.engines) - set(ENGINES)
        if unknown:
            raise ConfigError(f"unknown engines {sorted(unknown)}; choose from "
                              f"{', '.join(ENGINES)}")

    @classmethod
    def quick_settings(cls, **overrides) -> BenchSettings:
        """A few seconds per engine for CI: numbers are indicative, p99s unreliable."""
        base = cls(batch_sizes=(1, 8), warmup_s=0.05, budget_s=0.3, min_iters=3,
                   max_iters=200, offline_s=15.0, quick=True)
        return replace(base, **overrides)


# --- measuring ----------------------------------------------------------------------------


class _Timer:
    """Seconds taken by ``fn()``: perf_counter on CPU, CUDA events on a GPU."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.clock = "cuda-events" if self.cuda else "perf_counter"

    def __call__(self, fn: Callable[[], object]) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0


def measure_latency(engine, batch: int, settings: BenchSettings,
                    tick: Callable[[], None] | None = None) -> dict:
    """Time ``engine.run`` on ``batch`` generated windows; percentiles in milliseconds."""
    signal = music_like(batch * WINDOW_S + 0.1, seed=batch)
    windows = signal[: batch * WINDOW_SAMPLES].reshape(batch, WINDOW_SAMPLES)
    timer = _Timer(engine.device)

    def call() -> None:
        engine.run(windows)

    warm_end = time.perf_counter() + settings.warmup_s
    for i in range(10_000):
        call()
        if i >= 1 and time.perf_counter() >= warm_end:
            break
    times: list[float] = []
    deadline = time.perf_counter() + settings.budget_s
    while len(times) < settings.max_iters and (len(times) < settings.min_iters
                                               or time.perf_counter() < deadline):
        times.append(timer(call))
        if tick is not None:
            tick()
    t = np.asarray(times)
    p50, p95, p99 = np.percentile(t, [50, 95, 99]) * 1000.0
    windows_per_s = batch * len(t) / float(t.sum())
    return {"engine": engine.name, "batch": batch, "iterations": len(t),
            "p50_ms": round(float(p50), 3), "p95_ms": round(float(p95), 3),
            "p99_ms": round(float(p99), 3), "mean_ms": round(float(t.mean()) * 1000, 3),
            "p99_reliable": len(t) >= P99_MIN_SAMPLES,
            "windows_per_s": round(windows_per_s, 2),
            "x_realtime": round(windows_per_s * WINDOW_S, 1), "clock": timer.clock}


def measure_offline(model: TaggingModel, engine, seconds: float,
                    budget_s: float = 0.0) -> dict:
    """Tag a generated ``seconds``-long signal with a Tagger (hop = window) using ``engine``.

    The file is tagged again while ``budget_s`` lasts (at least once); the median run
    counts, since one run of a minute of audio takes only ~0.1 s.
    """
    from rtagger.pipeline.tagger import Tagger

    tagger = Tagger(model, engine="torch", device="cpu", hop_s=None)
    # Reuse the engine already built and warmed for the latency runs (an ONNX export or a
    # TensorRT load is not part of tagging speed).
    tagger.engine = engine
    signal = music_like(seconds, seed=7)
    tagger.tag_array(signal[: 2 * WINDOW_SAMPLES])  # warm-up, incl. the aggregator
    walls: list[float] = []
    deadline = time.perf_counter() + budget_s
    while not walls or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        result = tagger.tag_array(signal)
        walls.append(time.perf_counter() - t0)
    wall = float(np.median(walls))
    audio_s = len(signal) / SAMPLE_RATE
    return {"engine": engine.name, "audio_s": round(audio_s, 2), "wall_s": round(wall, 4),
            "runs": len(walls), "windows": len(result.windows),
            "batch_size": tagger.batch_size, "aggregation": result.aggregation,
            "x_realtime": round(audio_s / wall, 1)}


def bench_streams(model: str, *, streams: int, hop_s: float = DEFAULT_LIVE_HOP_S,
                  duration_s: float = 60.0, engine: str = "auto",
                  device: str = "cpu", url: str | None = None) -> dict:
    """End-to-end figure for ``streams`` simulated real-time streams.

    Starts ``rtagger serve`` as a separate process with ``engine`` on ``device`` (or, with
    ``url``, uses a server already running, e.g. on another host so that the clients do not
    share its cores) and plays ``streams`` clients paced to the wall clock (see
    :mod:`rtagger.bench.streams`): client-side capture-to-update latency, server latency,
    dropped windows and lag growth, the clients' own CPU share and, for a server started
    here, its CPU-seconds per stream-second and the capacity that implies.
    """
    from rtagger.bench.streams import run_stream_bench

    return run_stream_bench(model, streams=streams, seconds=duration_s, hop_s=hop_s,
                            device=device, engine=engine, url=url)


# --- the whole run ------------------------------------------------------------------------


def machine_info(device: str = "cpu") -> dict:
    """What the numbers were measured on."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    gpu = None
    if device.startswith("cuda") and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(torch.device(device))
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu": cpu_model(), "cpus_logical": os.cpu_count(), "cpus_usable": usable,
        "gpu": gpu, "cuda": torch.version.cuda if gpu else None,
        "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "onnxruntime": ort_version, "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(v, 2) for v in load] if load else None,
    }


def run_bench(settings: BenchSettings,
              progress: Callable[[str, int], None] | None = None) -> dict:
    """Measure every engine; return the JSON-able report.

    ``progress(label, total_steps)`` is called when a new measurement starts; ticks of
    ``progress("", 0)`` mark progress inside it (see :func:`register` for a rich bar).
    """
    from rtagger.model.cost import tagger_cost

    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    model = load_model(settings.model)
    started = time.time()
    names = settings.engines or tuple(available_engines(settings.device))
    if not names:
        reasons = "; ".join(f"{n}: {unavailable_reason(n, settings.device)}" for n in ENGINES)
        raise EngineUnavailable(f"no engine can run on {settings.device} here ({reasons})")
    cost = tagger_cost(model.tagger)
    report: dict = {
        "report_version": REPORT_VERSION,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "settings": asdict(settings),
        "machine": machine_info(settings.device),
        "model": {"name": model.name, "trained": model.trained,
                  "tagger_params": cost["params"], "macs_per_window": cost["macs_per_window"],
                  "window_s": round(WINDOW_S, 4)},
        "engines": {}, "latency": [], "offline": [],
        "streaming": None,
    }
    tick = (lambda: progress("", 0)) if progress is not None else None
    for name in names:
        reason = unavailable_reason(name, settings.device)
        if reason is not None:
            report["engines"][name] = {"available": False, "reason": reason}
            continue
        options = {"threads": settings.threads} if settings.threads and name != "tensorrt" \
            else {}
        t0 = time.perf_counter()
        try:
            engine = create_engine(model, name, settings.device, **options)
        except RtaggerError as e:
            report["engines"][name] = {"available": False, "reason": str(e)}
            continue
        if engine.name != name:  # a TensorRT build that failed: never time torch as it
            report["engines"][name] = {"available": False, "reason": engine.fallback_reason}
            del engine
            gc.collect()
            continue
        report["engines"][name] = {"available": True, "setup_s": round(time.perf_counter()
                                                                       - t0, 2),
                                   **engine.describe()}
        for batch in settings.batch_sizes:
            if progress is not None:
                progress(f"{name} batch {batch}", 0)
            report["latency"].append(measure_latency(engine, batch, settings, tick))
        if progress is not None:
            progress(f"{name} offline {settings.offline_s:.0f} s", 0)
        report["offline"].append(measure_offline(model, engine, settings.offline_s,
                                                 settings.budget_s))
        del engine
        gc.collect()  # release the engine's thread pool before the next one starts
    if settings.streams:
        if progress is not None:
            progress(f"{settings.streams} real-time streams, {settings.stream_s:.0f} s", 0)
        report["streaming"] = bench_streams(settings.model, streams=settings.streams,
                                            duration_s=settings.stream_s,
                                            engine=settings.stream_engine,
                                            device=settings.device, url=settings.stream_url)
    report["duration_s"] = round(time.time() - started, 1)
    return report


def results_table(report: dict):
    """A rich renderable: latency/throughput per engine and batch, offline speed, machine."""
    from rich.console import Group
    from rich.table import Table

    m = report["machine"]
    model = report["model"]
    title = (f"rtagger bench: {model['name']} on {report['settings']['device']} "
             f"({m['gpu'] or m['cpu']}, {m['cpus_usable']} CPUs, {m['torch_threads']} "
             f"threads, load {m['load_average'][0] if m['load_average'] else '?'})")
    lat = Table(title=title)
    for col in ("engine", "batch", "p50 ms", "p95 ms", "p99 ms", "windows/s", "x real time",
                "calls"):
        lat.add_column(col, justify="right" if col != "engine" else "left")
    for r in report["latency"]:
        p99 = f"{r['p99_ms']:.2f}" + ("" if r["p99_reliable"] else "*")
        lat.add_row(r["engine"], str(r["batch"]), f"{r['p50_ms']:.2f}", f"{r['p95_ms']:.2f}",
                    p99, f"{r['windows_per_s']:.1f}", f"{r['x_realtime']:.0f}",
                    str(r["iterations"]))
    off = Table(title="offline tagging (Tagger, hop = window)")
    for col in ("engine", "audio s", "wall s (median)", "x real time", "runs"):
        off.add_column(col, justify="right" if col != "engine" else "left")
    for r in report["offline"]:
        off.add_row(r["engine"], f"{r['audio_s']:.1f}", f"{r['wall_s']:.3f}",
                    f"{r['x_realtime']:.0f}", str(r["runs"]))
    notes = [f"* p99 from fewer than {P99_MIN_SAMPLES} calls: not stable"]
    for name, e in report["engines"].items():
        if not e.get("available"):
            notes.append(f"{name}: unavailable ({e['reason']})")
    parts = [lat, off]
    st = report.get("streaming")
    if st:
        stream = Table(title=f"streaming: {st['streams']} real-time streams, hop "
                             f"{st['hop_s']} s, {st['seconds']:.0f} s, engine {st['engine']}")
        for col in ("client p50 ms", "client p99 ms", "server p99 ms", "updates",
                    "dropped", "lag growth s/s", "errors"):
            stream.add_column(col, justify="right")
        c, sv = st["client_latency_ms"], st["server_latency_ms"]
        stream.add_row(str(c["p50"]), str(c["p99"]), str(sv["p99"]),
                       f"{st['updates']}/{st['expected_updates']}", str(st["dropped_windows"]),
                       str(st["lag_s"]["growth_s_per_s"]), str(len(st["errors"])))
        cost = Table(title="streaming CPU (cores = CPU-s per wall s)")
        for col in ("client cores", "server cores", "busiest server thread",
                    "server CPU-s per stream-s", "capacity (streams)"):
            cost.add_column(col, justify="right")
        per_stream = st.get("server_cpu_s_per_stream_s")
        threads = st.get("server_busiest_threads_share") or {}
        cost.add_row(f"{st['client_cpu_share']:.2f}",
                     "-" if st.get("server_cpu_share") is None
                     else f"{st['server_cpu_share']:.2f}",
                     f"{max(threads.values()):.2f}" if threads else "-",
                     "-" if per_stream is None else f"{per_stream:.4f}",
                     "-" if st.get("capacity_streams") is None
                     else f"{st['capacity_streams']:.0f} on {st['cores']} cores")
        parts += [stream, cost]
        notes.append("client cores: the bench's own clients, which share the machine with a "
                     "server started here; capacity = cores / server CPU-s per stream-s")
    return Group(*parts, *notes)


# --- command line -------------------------------------------------------------------------


def _parse_batches(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError as e:
        raise ConfigError(f"--batch-sizes takes comma-separated integers, got {text!r}") from e
    return sizes

