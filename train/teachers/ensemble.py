"""The teacher ensemble of the multi-source student: window probabilities over vocabulary v2.

Members: rtagger's own synthetic-trained tagger for v1's tags, and musicnn 0.1.0's converted
taggers (MagnaTagATune, Million Song Dataset) for the real-world tags. Each v2 tag takes its
target from the members its sources name (``rtagger/data/tags_v2.csv``):

- a tag with teacher sources (``MTT:``/``MSD:``): per family, the maximum over its synonyms
  and over that family's members averaged (``MTT_musicnn`` and ``MTT_vgg`` both say
  ``female``), then the families averaged;
- a tag whose only source is ``synth`` (mode, structure, latin, ...): the v1 tagger's
  probability, when the ensemble has one;
- otherwise NaN: no member labels the tag, and the student's loss masks it
  (:func:`rtagger.train.fit.loop.masked_bce`).

musicnn reads 3 s patches (187 frames); a 3.69 s window (231 frames) is covered by its two
patches starting at frames 0 and 44, and their probabilities are averaged.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from rtagger.audio.decode import FRAMES_PER_WINDOW, WINDOW_SAMPLES
from rtagger.errors import ConfigError
from rtagger.model.checkpoint import TaggingModel, load_model
from rtagger.model.vocab import sources_v2, tags_v2
from rtagger.train.teachers.musicnn import PATCH_FRAMES, Teacher, load_teacher, read_description

# Two patches cover the window: frames [0, 187) and [44, 231).
WINDOW_PATCH_HOP = FRAMES_PER_WINDOW - PATCH_FRAMES


class Ensemble:
    """Callable: ``(batch, WINDOW_SAMPLES)`` float32 waves -> ``(batch, len(tags))`` targets.

    ``tags`` defaults to vocabulary v2; entries no member labels are NaN.
    """

    def __init__(self, v1_tagger: TaggingModel | None, teachers: list[Teacher],
                 teacher_sha256: list[str], tags: list[str] | None = None) -> None:
        if v1_tagger is None and not teachers:
            raise ConfigError("a teacher ensemble needs at least one member")
        self.tags = list(tags or tags_v2())
        self.v1 = v1_tagger
        self.teachers = teachers
        self.members = ([{"name": v1_tagger.name, "sha256": v1_tagger.weights_sha256}]
                        if v1_tagger is not None else [])
        self.members += [{"name": t.name, "sha256": s}
                         for t, s in zip(teachers, teacher_sha256, strict=True)]
        self.sha256 = hashlib.sha256(json.dumps(self.members, sort_keys=True)
                                     .encode()).hexdigest()
        self._plan = self._make_plan()

    def _make_plan(self) -> list[tuple[int, str, list[tuple[int, list[int]]] | int | None]]:
        """Per output tag: ("teachers", [(member, [teacher tag indices]), ...] per family),
        ("v1", index in the v1 tagger's output), or ("none", None)."""
        sources = sources_v2()
        v1_index = {t: i for i, t in enumerate(self.v1.tags)} if self.v1 is not None else {}
        plan = []
        for j, tag in enumerate(self.tags):
            families: dict[str, list[tuple[int, list[int]]]] = defaultdict(list)
            for src in sources.get(tag, ()):
                if ":" not in src:
                    continue
                family, name = src.split(":", 1)
                for m, teacher in enumerate(self.teachers):
                    if teacher.name.startswith(family + "_") and name in teacher.tags:
                        hit = next((e for e in families[family] if e[0] == m), None)
                        if hit is None:
                            families[family].append((m, [teacher.tags.index(name)]))
                        else:
                            hit[1].append(teacher.tags.index(name))
            if families:
                plan.append((j, "teachers", list(families.values())))
            elif tag in v1_index:
                plan.append((j, "v1", v1_index[tag]))
            else:
                plan.append((j, "none", None))
        return plan

    @property
    def labelled_tags(self) -> list[str]:
        """The tags some member labels (the others are always NaN)."""
        return [self.tags[j] for j, kind, _ in self._plan if kind != "none"]

    @torch.inference_mode()
    def __call__(self, waves: torch.Tensor) -> np.ndarray:
        if waves.ndim != 2 or waves.shape[1] != WINDOW_SAMPLES:
            raise ConfigError(f"the ensemble takes (batch, {WINDOW_SAMPLES}) windows, got "
                              f"{tuple(waves.shape)}")
        # (batch, n_tags) per teacher: the mean of the window's two patches
        per_teacher = [t(waves, hop_frames=WINDOW_PATCH_HOP).mean(1).float().cpu().numpy()
                       for t in self.teachers]
        v1 = (torch.sigmoid(self.v1.tagger(waves)[0]).float().cpu().numpy()
              if self.v1 is not None else None)
        out = np.full((waves.shape[0], len(self.tags)), np.nan, np.float32)
        for j, kind, how in self._plan:
            if kind == "v1":
                out[:, j] = v1[:, how]
            elif kind == "teachers":
                out[:, j] = np.mean([np.mean([per_teacher[m][:, idx].max(1) for m, idx in fam],
                                             axis=0) for fam in how], axis=0)
        return out


def load_ensemble(v1_tagger: str | Path | None, teacher_files: list[str | Path],
                  device: str = "cpu") -> Ensemble:
    """An :class:`Ensemble` from a v1 checkpoint (or None) and converted musicnn files."""
    v1 = load_model(v1_tagger, device=device) if v1_tagger is not None else None
    teachers = [load_teacher(p, device=device) for p in teacher_files]
    shas = [read_description(p)["weights_sha256"] for p in teacher_files]
    return Ensemble(v1, teachers, shas)
