"""Tag vocabularies shipped with the package, and which one a tag list is.

- v1 (``synth_tags_v1.csv``): the 36 tags of the synthetic benchmark, each with the exact
  rule that labels a synthetic song.
- v2 (``tags_v2.csv``): v1's 36 tags first, in v1's order and with v1's meaning, then the
  real-world tags musicnn's teachers know (MagnaTagATune's 50 and the Million Song
  Dataset's 50, every one used exactly once), synonyms merged (``female`` / ``woman`` /
  ``female vocal`` / ``female voice`` / ``female vocalists`` -> ``female_vocals``) and
  grouped (genre, instrument, tempo, mode, structure, vocals, mood, era). Each tag lists
  its sources: ``synth`` (the v1 rule) and ``MTT:<tag>`` / ``MSD:<tag>`` (a teacher's
  output). A tag no source supervises is not in the vocabulary.

A checkpoint records its vocabulary (:func:`vocabulary_version`), so a model's tags can be
traced back to their definitions here.
"""

from __future__ import annotations

import csv
from functools import cache
from importlib import resources

VOCAB_V1 = "synth_tags_v1.csv"
VOCAB_V2 = "tags_v2.csv"


@cache
def _read(name: str) -> tuple[dict[str, str], ...]:
    """The rows of a bundled vocabulary CSV, in their fixed order (the one reader)."""
    text = resources.files("rtagger.data").joinpath(name).read_text(encoding="utf-8")
    return tuple(csv.DictReader(text.splitlines()))


def load_vocabulary(name: str = VOCAB_V1) -> tuple[tuple[str, str, str], ...]:
    """``(tag, group, rule)`` rows of v1, in their fixed order."""
    return tuple((r["tag"], r["group"], r["rule"]) for r in _read(name))


def tags_v1() -> list[str]:
    return [t for t, _, _ in load_vocabulary()]


def tag_groups_v1() -> dict[str, str]:
    return {t: g for t, g, _ in load_vocabulary()}


def _v2_rows() -> tuple[tuple[str, str, tuple[str, ...], str], ...]:
    return tuple((r["tag"], r["group"], tuple(r["sources"].split(";")), r["note"])
                 for r in _read(VOCAB_V2))


def tags_v2() -> list[str]:
    return [t for t, _, _, _ in _v2_rows()]


def tag_groups_v2() -> dict[str, str]:
    return {t: g for t, g, _, _ in _v2_rows()}


def sources_v2() -> dict[str, tuple[str, ...]]:
    """tag -> its sources: ``synth`` and/or ``MTT:<teacher tag>`` / ``MSD:<teacher tag>``."""
    return {t: s for t, _, s, _ in _v2_rows()}


def vocabulary_tags(version: str) -> list[str]:
    """The tag list of a bundled vocabulary by version (``"v1"``, ``"v2"``)."""
    tables = {"v1": tags_v1, "v2": tags_v2}
    if version not in tables:
        from rtagger.errors import ConfigError

        raise ConfigError(f"unknown vocabulary {version!r}; choose one of {', '.join(tables)}")
    return tables[version]()


def vocabulary_version(tags: list[str]) -> str | None:
    """``"v1"`` or ``"v2"`` when ``tags`` is exactly that vocabulary, else None (custom)."""
    if list(tags) == tags_v2():
        return "v2"
    if list(tags) == tags_v1():
        return "v1"
    return None


def tag_groups(tags: list[str]) -> dict[str, str]:
    """The group of every tag that v2 defines (v1's groups are v2's); others get ``""``."""
    groups = tag_groups_v2()
    return {t: groups.get(t, "") for t in tags}


# Tags of one set exclude each other by their rules (tempo below 90 vs 140 and above; the
# tonic chord is major or minor): a track may carry at most one of each set.
EXCLUSIVE_V1: tuple[tuple[str, ...], ...] = (("slow", "fast"), ("major", "minor"))


def exclusive_indices(tags: list[str],
                      sets: tuple[tuple[str, ...], ...] = EXCLUSIVE_V1) -> list[list[int]]:
    """Index groups of ``tags`` that exclude each other (sets with fewer than 2 present: none)."""
    pos = {t: i for i, t in enumerate(tags)}
    groups = [[pos[t] for t in group if t in pos] for group in sets]
    return [g for g in groups if len(g) > 1]
