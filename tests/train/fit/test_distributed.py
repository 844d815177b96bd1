"""Two real processes under torchrun (gloo on the CPU): DDP training and pseudo-labelling.

The test launches this file with ``python -m torch.distributed.run --nproc_per_node 2``,
as users launch training, and compares what each rank drew and wrote:

- the ranks draw different batches, noise and dropout;
- a run killed after its step-4 snapshot resumes per rank: every rank's batches and RNG
  states after the resume equal those of an uninterrupted run, and so do the weights;
- pseudo-labelling with 2 ranks writes disjoint shards (``k % world == rank``) whose union
  equals a 1-process run.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[3]
MAX_STEPS, EVERY, DIE_AT_BATCH = 8, 4, 6  # the kill comes after the step-4 snapshot
TRACKS_PER_SHARD = 2

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available")


def _recipe(data: Path):
    from rtagger.train.fit.recipe import recipe_from_dict

    return recipe_from_dict({
        "name": "ddp", "stage": "tagger", "seed": 0,
        "model": {"size": "debug", "dropout": 0.1, "drop_path": 0.1},
        "data": {"labelled": str(data / "train.jsonl"), "valid": str(data / "valid.jsonl"),
                 "cache": str(data / "cache"), "valid_windows_per_song": 1},
        "optim": {"batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "max_steps": MAX_STEPS},
        "eval": {"every_steps": EVERY, "patience": 10},
        "augment": {"pitch_p": 0.0, "reverb_p": 0.0, "delay_p": 0.0, "noise_p": 0.5,
                    "time_mask_p": 0.5},
    })


def _sha(x) -> str:
    return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()[:16]


def _worker_train(data: Path, out: Path, die_at: int) -> Path:
    """One rank of a training run, recording per step what its random streams produced."""
    from rtagger.train.fit.loop import init_distributed, train
    from rtagger.train.fit.tasks import TaggerTask

    info = init_distributed()
    r = _recipe(data)
    task = TaggerTask(r)
    real_batch, real_loss = task.batch, task.loss_inputs
    log = (out / f"draws-rank{info.rank}.jsonl").open("a")
    calls, pending = [0], {}

    def batch(rng, n):
        calls[0] += 1
        if calls[0] == die_at and info.rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)  # a real kill: no cleanup, no exception
        inputs, targets = real_batch(rng, n)
        pending["batch"] = _sha(inputs.numpy())
        return inputs, targets

    def loss_inputs(model, inputs, gen):
        # States as the step begins: gen drives augmentation, the global RNG dropout.
        log.write(json.dumps({"batch": pending.pop("batch"), "gen": _sha(gen.get_state()),
                              "torch": _sha(torch.random.get_rng_state())}) + "\n")
        log.flush()
        return real_loss(model, inputs, gen)

    task.batch, task.loss_inputs = batch, loss_inputs
    return train(task, r, out / "run", progress=False)


def _worker_pseudo(data: Path, out: Path, teacher: Path) -> None:
    """One rank of pseudo-labelling; records which shard files this rank wrote."""
    from rtagger.train.data.manifest import read_manifest
    from rtagger.train.fit import pseudo
    from rtagger.train.fit.loop import init_distributed

    info = init_distributed()
    pseudo.TRACKS_PER_SHARD = TRACKS_PER_SHARD
    wrote, real = [], pseudo.atomic_write

    def recording(path, payload):
        wrote.append(path.name)
        return real(path, payload)

    pseudo.atomic_write = recording
    pseudo.pseudo_label(teacher, read_manifest(data / "pool.jsonl"), data / "cache",
                        out / "pseudo-2", hop_s=1.0, progress=False)
    (out / f"pseudo-rank{info.rank}.json").write_text(json.dumps(wrote))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
           "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), __file__, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A toy labelled set (4 train, 2 valid songs) and a 5-song pool, all 4 s, cached."""
    from conftest import toy_song, write_audio

    from rtagger.audio.decode import SAMPLE_RATE
    from rtagger.train.data.cache import build_cache
    from rtagger.train.data.manifest import Track, write_manifest

    d = tmp_path_factory.mktemp("ddp")
    every = []
    for split, n in {"train": 4, "valid": 2, "pool": 5}.items():
        tracks = []
        for i in range(n):
            kind = "piano" if i % 2 == 0 else "drums"
            p = write_audio(d / f"{split}-{i}.flac", toy_song(kind, 4.0, 100 * len(split) + i),
                            SAMPLE_RATE, "flac", "s16")
            tags = (kind,) if split != "pool" else ()
            tracks.append(Track(f"{split}-{i}", str(p), tags, split, 4.0))
        write_manifest(d / f"{split}.jsonl", tracks)
        every += tracks
    assert build_cache(every, d / "cache", progress=False).n_failed == 0
    return d


def _draws(out: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (out / f"draws-rank{rank}.jsonl").read_text()
            .splitlines()]


def test_ddp_ranks_draw_their_own_batches_and_resume_their_own_streams(data, tmp_path,
                                                                       monkeypatch):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir()
    killed.mkdir()
    # 1. An uninterrupted run, then (same launch) 2-rank pseudo-labelling with its checkpoint.
    res = _torchrun("train+pseudo", str(data), str(straight), "0")
    assert res.returncode == 0, res.stderr[-4000:]
    teacher = straight / "run" / "best.safetensors"
    a = [_draws(straight, r) for r in (0, 1)]
    assert [len(x) for x in a] == [MAX_STEPS, MAX_STEPS]
    for step in range(MAX_STEPS):
        for stream in ("batch", "gen", "torch"):
            assert a[0][step][stream] != a[1][step][stream], (step, stream)

    # 2. The same run, rank 0 SIGKILLed while drawing step 6's batch: torchrun fails.
    res = _torchrun("train", str(data), str(killed), str(DIE_AT_BATCH))
    assert res.returncode != 0
    snap = torch.load(killed / "run" / "last.pt", weights_only=False)
    assert snap["state"]["step"] == EVERY and len(snap["rng"]) == 2
    assert snap["rng"][0]["numpy_rng"] != snap["rng"][1]["numpy_rng"]
    for r in (0, 1):
        (killed / f"draws-rank{r}.jsonl").unlink()

    # 3. Resumed: each rank continues its own streams, exactly as without the kill.
    res = _torchrun("train", str(data), str(killed), "0")
    assert res.returncode == 0, res.stderr[-4000:]
    for r in (0, 1):
        assert _draws(killed, r) == a[r][EVERY:], f"rank {r} after the resume"
    done_a = torch.load(straight / "run" / "last.pt", weights_only=False)
    done_b = torch.load(killed / "run" / "last.pt", weights_only=False)
    assert done_a["state"]["step"] == done_b["state"]["step"] == MAX_STEPS
    for k, v in done_a["model"].items():
        torch.testing.assert_close(done_b["model"][k], v, msg=k)

    # 4. Pseudo-labels: rank r wrote the shards k % 2 == r; together a 1-process run.
    from rtagger.train.data.manifest import read_manifest
    from rtagger.train.data.windows import read_shard
    from rtagger.train.fit import pseudo

    wrote = [json.loads((straight / f"pseudo-rank{r}.json").read_text()) for r in (0, 1)]
    assert wrote == [["shard-00000.npz", "shard-00002.npz"], ["shard-00001.npz"]]
    monkeypatch.setattr(pseudo, "TRACKS_PER_SHARD", TRACKS_PER_SHARD)
    one = pseudo.pseudo_label(teacher, read_manifest(data / "pool.jsonl"), data / "cache",
                              tmp_path / "pseudo-1", hop_s=1.0, progress=False)
    assert one.shards_total == 3
    names = sorted(p.name for p in (straight / "pseudo-2").glob("shard-*.npz"))
    assert names == sorted(p.name for p in (tmp_path / "pseudo-1").glob("shard-*.npz"))
    for name in names:
        two, single = (read_shard(d / name) for d in (straight / "pseudo-2", tmp_path / "pseudo-1"))
        assert two.refs == single.refs and two.meta == single.meta
        np.testing.assert_array_equal(two.starts, single.starts)
        np.testing.assert_allclose(two.probs, single.probs, atol=2e-3)


if __name__ == "__main__":  # one rank, started by torchrun from the test above
    mode, data_dir, out_dir, die_at = sys.argv[1:5]
    best = _worker_train(Path(data_dir), Path(out_dir), int(die_at))
    if mode == "train+pseudo":  # saves a launch: the pseudo ranks reuse this process group
        _worker_pseudo(Path(data_dir), Path(out_dir), best)
    if dist.is_initialized():
        dist.destroy_process_group()
