"""The one append-only JSONL idiom: kill-safe appends, resume past a truncated last line."""

from __future__ import annotations

import pytest

from rtagger.jsonl import JsonlAppender, JsonlError, read_records


def test_append_resume_after_a_killed_writer(tmp_path):
    path = tmp_path / "log.jsonl"
    with JsonlAppender(path, durable=True) as log:
        log.write({"id": 1})
        log.write({"id": 2, "name": "ünïcode"})
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"id": 3, "na')  # a writer killed mid-line
    assert [r["id"] for _, r in read_records(path)] == [1, 2]
    with JsonlAppender(path) as log:  # resuming cuts the half line first
        log.write({"id": 3})
    assert [(n, r["id"]) for n, r in read_records(path)] == [(1, 1), (2, 2), (3, 3)]
    assert read_records(path)[1][1]["name"] == "ünïcode"
    with JsonlAppender(path, append=False) as log:
        log.write({"id": 9})
    assert [r["id"] for _, r in read_records(path)] == [9]
    assert read_records(tmp_path / "absent.jsonl") == []


@pytest.mark.parametrize("text, line, reason", [
    ('{"id": 1}\nnot json\n{"id": 2}\n', 2, "invalid JSON"),
    ('{"id": 1}\n[1, 2]\n', 2, "expected a JSON object, got list"),
])
def test_a_bad_line_inside_the_log_is_named(tmp_path, text, line, reason):
    path = tmp_path / "log.jsonl"
    path.write_text(text)
    with pytest.raises(JsonlError, match=reason) as e:
        read_records(path)
    assert e.value.line == line and str(path) in str(e.value)
