"""The training loop: one loop for every stage, read top to bottom.

A stage (:mod:`rtagger.train.fit.tasks`) supplies the model, batches, the loss targets, an
evaluation and the export to a rtagger checkpoint; this loop does the rest the same way for all:
AdamW with linear warm-up and cosine decay, mixed precision on CUDA, gradient clipping,
evaluation every ``eval.every_steps``, early stopping on the validation metric, the best
checkpoint kept, and DistributedDataParallel when launched with ``torchrun``.

Resumable: ``last.pt`` (model, optimizer, schedule, step, RNG states, early-stopping state)
is written atomically at every evaluation; a killed run started again with the same recipe
continues from it and draws the same batches it would have drawn.

Under DDP every rank has its own random streams (batch sampling, augmentation noise, dropout),
seeded from ``(recipe.seed, rank)``. Rank 0 gathers all ranks' states into ``last.pt``, so a
resumed rank continues its own streams; a resume with another world size restarts the
streams from ``(recipe.seed, rank, step)`` and says so.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from rtagger.atomic import atomic_path, atomic_write
from rtagger.errors import ConfigError
from rtagger.model.checkpoint import TaggingModel, save_model
from rtagger.train.fit.recipe import Recipe, portable_source
from rtagger.train.progress import Bar

log = logging.getLogger(__name__)


class Task(Protocol):
    """What a training stage provides to the loop."""

    model: nn.Module

    def batch(self, rng: np.random.Generator, n: int) -> tuple:
        """Inputs (a tensor or a tuple of tensors) and targets in [0, 1], on the CPU."""

    def loss_inputs(self, model: nn.Module, inputs, gen: torch.Generator) -> torch.Tensor:
        """Logits for a batch already on the device (noise/augmentation applied here)."""

    def evaluate(self, model: nn.Module, device: torch.device) -> dict:
        """Validation metrics; must include the recipe's ``eval.metric``."""

    def export(self, model: nn.Module, metrics: dict) -> TaggingModel:
        """The rtagger checkpoint for this stage's model."""


@dataclass
class TrainState:
    step: int = 0
    best: float = -math.inf
    best_step: int = 0
    bad_evals: int = 0
    stopped: bool = False  # early stopping fired; a resumed run does not train further
    history: list[dict] = field(default_factory=list)


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """torchrun sets RANK/WORLD_SIZE; gloo on CPU, NCCL on GPUs."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return DistInfo()
    if not dist.is_initialized():
        if torch.cuda.is_available():  # NCCL collectives (gather_object too) use this device
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def _to(x, dev: torch.device):
    if isinstance(x, tuple | list):
        return type(x)(_to(v, dev) for v in x)
    return x.to(dev, non_blocking=True)


def lr_at(step: int, recipe: Recipe) -> float:
    o = recipe.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = (step - o.warmup_steps) / max(1, o.max_steps - o.warmup_steps)
    return o.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy over the targets that exist.

    A NaN target means "no source labels this tag for this example" (a real recording has
    no synthetic rule; a teacher does not know mode): it adds nothing to the loss or its
    gradient. Without NaNs this is exactly ``binary_cross_entropy_with_logits``.
    """
    known = ~torch.isnan(targets)
    if bool(known.all()):
        return nn.functional.binary_cross_entropy_with_logits(logits, targets)
    per = nn.functional.binary_cross_entropy_with_logits(
        logits, torch.where(known, targets, torch.zeros_like(targets)), reduction="none")
    return (per * known).sum() / known.sum().clamp(min=1)


def atomic_torch_save(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def train(task: Task, recipe: Recipe, out_dir: str | Path, *, progress: bool = True,
          device: str | None = None) -> Path:
    """Run (or resume) one stage; returns the path of the best checkpoint."""
    out = Path(out_dir)
    info = init_distributed()
    dev = torch.device(device or (f"cuda:{info.local_rank}" if torch.cuda.is_available()
                                  else "cpu"))
    if info.main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "recipe.json", json.dumps(recipe.to_dict(), indent=2))
    model = task.model.to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.optim.lr,
                            weight_decay=recipe.optim.weight_decay)
    amp = recipe.optim.amp and dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    # Each rank draws different batches and noise; rank 0 alone evaluates and writes.
    rng, gen = _seed_streams(recipe.seed, info.rank, dev)
    state = TrainState()
    last = out / "last.pt"
    if last.exists():
        state, rng, gen = _resume(last, recipe, model, opt, scaler, info, dev)
        log.info("resumed %s at step %d", recipe.name, state.step)
    ddp = (nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if
                                               dev.type == "cuda" else None)
           if info.world > 1 else model)
    per_rank = max(1, recipe.optim.batch_size // info.world)
    bar = Bar(recipe.name, recipe.optim.max_steps, enabled=progress and info.main,
              completed=state.step, fields={"loss": ".4f", "windows/s": ".1f"})
    t_last, seen = time.perf_counter(), 0  # throughput shown live
    t_eval, seen_eval = time.perf_counter(), 0  # throughput recorded per evaluation
    while state.step < recipe.optim.max_steps and not state.stopped:
        model.train()
        for g in opt.param_groups:
            g["lr"] = lr_at(state.step, recipe)
        inputs, targets = task.batch(rng, per_rank)
        inputs, targets = _to(inputs, dev), targets.to(dev, non_blocking=True)
        with torch.autocast(dev.type, dtype=torch.float16, enabled=amp):
            logits = task.loss_inputs(ddp, inputs, gen)
        loss = masked_bce(logits.float(), targets)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{recipe.name}: loss is {loss.item()} at step "
                                     f"{state.step}; lower optim.lr or check the data")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(model.parameters(), recipe.optim.grad_clip)
        scaler.step(opt)
        scaler.update()
        state.step += 1
        seen += len(targets) * info.world
        seen_eval += len(targets) * info.world
        now = time.perf_counter()
        bar.advance(1, **{"loss": loss.item(), "windows/s": seen / max(now - t_last, 1e-9)})
        if now - t_last > 10:
            t_last, seen = now, 0
        if state.step % recipe.eval.every_steps == 0 or state.step == recipe.optim.max_steps:
            rate = seen_eval / max(time.perf_counter() - t_eval, 1e-9)
            state.stopped = _evaluate(task, model, recipe, state, out, info, dev,
                                      {"train_windows_per_s": round(rate, 2),
                                       "device": str(dev), "world": info.world})
            t_eval, seen_eval = time.perf_counter(), 0
            streams = _gather(_rng_state(rng, gen, dev), info)  # a collective: every rank
            if info.main:
                atomic_torch_save(_snapshot(recipe, model, opt, scaler, streams, state), last)
            if info.world > 1:  # every rank stops together
                flag = torch.tensor([int(state.stopped)], device=dev)
                dist.broadcast(flag, 0)
                state.stopped = bool(flag.item())
    bar.close()
    if info.world > 1:
        dist.barrier()
    best = out / "best.safetensors"
    if info.main and not best.exists():
        raise ConfigError(f"{recipe.name}: no checkpoint was written (max_steps too small?)")
    return best


def _evaluate(task: Task, model: nn.Module, recipe: Recipe, state: TrainState, out: Path,
              info: DistInfo, dev: torch.device, speed: dict) -> bool:
    """Evaluate on rank 0, keep the best checkpoint; returns True to stop early."""
    if not info.main:
        return False
    model.eval()
    with torch.no_grad():
        metrics = task.evaluate(model, dev)
    value = metrics[recipe.eval.metric]
    record = {"step": state.step, **{k: v for k, v in metrics.items() if np.isscalar(v)},
              **speed}
    state.history.append(record)
    log.info("%s step %d: %s = %.4f", recipe.name, state.step, recipe.eval.metric, value)
    if value > state.best:
        state.best, state.best_step, state.bad_evals = value, state.step, 0
        export = task.export(model, {**metrics, "step": state.step})
        export.recipe = {**recipe.to_dict(), "source": portable_source(recipe.source)}
        save_model(export, out / "best.safetensors")
    else:
        state.bad_evals += 1
    atomic_write(out / "history.json", json.dumps(
        {"recipe": recipe.name, "best_step": state.best_step, "best": state.best,
         "history": state.history}, indent=2))
    return state.bad_evals >= recipe.eval.patience


def _seed_streams(seed: int, rank: int, dev: torch.device,
                  step: int | None = None) -> tuple[np.random.Generator, torch.Generator]:
    """This rank's batch sampler and noise generator, and the global torch seed (dropout).

    Rank 0 of a fresh run is seeded exactly as a single-process run.
    """
    key = [seed, rank] if step is None else [seed, rank, step]
    rng = np.random.default_rng(key)
    if step is None:
        gen_seed, global_seed = seed * 1000 + rank, seed + 10_000 * rank
    else:
        gen_seed, global_seed = (int(x) for x in np.random.SeedSequence(key).generate_state(2))
    gen = torch.Generator(device=dev).manual_seed(gen_seed)
    torch.manual_seed(global_seed)
    return rng, gen


def _rng_state(rng: np.random.Generator, gen: torch.Generator, dev: torch.device) -> dict:
    """One rank's random streams: batch sampling, noise generator, global CPU/CUDA RNG."""
    state = {"numpy_rng": rng.bit_generator.state, "gen": gen.get_state(),
             "torch_rng": torch.random.get_rng_state()}
    if dev.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(dev)
    return state


def _gather(state: dict, info: DistInfo) -> list[dict] | None:
    """Every rank's ``state`` on rank 0, in rank order (None on the other ranks)."""
    if info.world == 1:
        return [state]
    everyone = [None] * info.world if info.main else None
    dist.gather_object(state, everyone, dst=0)
    return everyone


def _snapshot(recipe, model, opt, scaler, streams: list[dict], state: TrainState) -> dict:
    return {
        "recipe_digest": recipe.digest(),
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": streams,  # one entry per rank
        "state": state.__dict__,
    }


def _resume(path: Path, recipe: Recipe, model, opt, scaler, info: DistInfo,
            dev: torch.device) -> tuple[TrainState, np.random.Generator, torch.Generator]:
    snap = torch.load(path, map_location="cpu", weights_only=False)
    if snap["recipe_digest"] != recipe.digest():
        raise ConfigError(f"{path} belongs to another recipe (digest {snap['recipe_digest']} "
                          f"!= {recipe.digest()}); use a new output folder or delete it")
    model.load_state_dict(snap["model"])
    opt.load_state_dict(snap["optimizer"])
    scaler.load_state_dict(snap["scaler"])
    state = TrainState(**snap["state"])
    # Snapshots written before per-rank streams hold one set of states, at the top level.
    streams = snap.get("rng") or [{k: snap[k] for k in ("numpy_rng", "gen", "torch_rng")}]
    if len(streams) != info.world:
        log.warning("%s was written by %d ranks, this run has %d: every rank's random "
                    "streams restart from (seed, rank, step %d), so batches differ from an "
                    "uninterrupted run", path, len(streams), info.world, state.step)
        rng, gen = _seed_streams(recipe.seed, info.rank, dev, state.step)
        return state, rng, gen
    own = streams[info.rank]
    rng = np.random.default_rng()
    rng.bit_generator.state = own["numpy_rng"]
    gen = torch.Generator(device=dev)
    gen.set_state(own["gen"])
    torch.random.set_rng_state(own["torch_rng"])
    if dev.type == "cuda" and "cuda_rng" in own:
        torch.cuda.set_rng_state(own["cuda_rng"], dev)
    return state, rng, gen
