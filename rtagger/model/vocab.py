"""Tag vocabularies shipped with the package (v1: 36 tags of the synthetic benchmark)."""

from __future__ import annotations

import csv
from functools import cache
from importlib import resources

VOCAB_V1 = "synth_tags_v1.csv"


@cache
def load_vocabulary(name: str = VOCAB_V1) -> tuple[tuple[str, str, str], ...]:
    """``(tag, group, rule)`` rows of a bundled vocabulary, in their fixed order."""
    text = resources.files("rtagger.data").joinpath(name).read_text(encoding="utf-8")
    return tuple((r["tag"], r["group"], r["rule"]) for r in csv.DictReader(text.splitlines()))


def tags_v1() -> list[str]:
    return [t for t, _, _ in load_vocabulary()]


def tag_groups_v1() -> dict[str, str]:
    return {t: g for t, g, _ in load_vocabulary()}


# Tags of one set exclude each other by their rules (tempo below 90 vs 140 and above; the
# tonic chord is major or minor): a track may carry at most one of each set.
EXCLUSIVE_V1: tuple[tuple[str, ...], ...] = (("slow", "fast"), ("major", "minor"))


def exclusive_indices(tags: list[str],
                      sets: tuple[tuple[str, ...], ...] = EXCLUSIVE_V1) -> list[list[int]]:
    """Index groups of ``tags`` that exclude each other (sets with fewer than 2 present: none)."""
    pos = {t: i for i, t in enumerate(tags)}
    groups = [[pos[t] for t in group if t in pos] for group in sets]
    return [g for g in groups if len(g) > 1]
