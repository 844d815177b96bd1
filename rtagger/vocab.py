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
