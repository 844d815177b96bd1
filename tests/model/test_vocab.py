"""Vocabularies: v1 (synthetic benchmark) and v2 (v1 + the teachers' real-world tags)."""

from __future__ import annotations

from collections import Counter

from rtagger.model.checkpoint import build_untrained, load_model
from rtagger.model.vocab import (
    sources_v2,
    tag_groups_v1,
    tag_groups_v2,
    tags_v1,
    tags_v2,
    vocabulary_version,
)
from rtagger.train.teachers.musicnn import MSD_TAGS, MTT_TAGS


def test_v2_keeps_v1_first_with_its_groups_and_rules():
    v1, v2 = tags_v1(), tags_v2()
    assert v2[: len(v1)] == v1 and len(set(v2)) == len(v2)
    groups = tag_groups_v2()
    assert all(groups[t] == g for t, g in tag_groups_v1().items())
    assert all("synth" in sources_v2()[t] for t in v1)  # the v1 rule still defines them
    assert set(groups.values()) == {"genre", "instrument", "tempo", "mode", "structure",
                                    "vocals", "mood", "era"}


def test_every_teacher_tag_is_used_exactly_once_and_synonyms_merge():
    used = Counter(s for srcs in sources_v2().values() for s in srcs if s != "synth")
    assert max(used.values()) == 1
    assert set(used) == {f"MTT:{t}" for t in MTT_TAGS} | {f"MSD:{t}" for t in MSD_TAGS}
    src = sources_v2()
    assert set(src["female_vocals"]) >= {"MTT:female", "MTT:woman", "MTT:female vocal",
                                         "MTT:female voice", "MSD:female vocalists"}
    assert set(src["instrumental"]) == {"MTT:no vocals", "MTT:no vocal", "MTT:no voice",
                                        "MSD:instrumental"}
    assert all(srcs for srcs in src.values())  # no tag without a source


def test_checkpoints_record_their_vocabulary():
    assert vocabulary_version(tags_v1()) == "v1" and vocabulary_version(tags_v2()) == "v2"
    assert vocabulary_version(["a", "b"]) is None
    assert load_model("default").describe()["vocabulary"] == "v2"
    m = build_untrained("debug", tags_v2(), with_aggregator=False)
    assert m.describe()["vocabulary"] == "v2" and m.tag_groups["female_vocals"] == "vocals"
