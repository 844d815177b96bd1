"""The command line, run as users run it (typer's runner and a real subprocess)."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from rtagger.cli.main import app

runner = CliRunner()
MODEL = ["--model", "untrained:debug"]


def _json(args):
    res = runner.invoke(app, ["tag", *MODEL, "--format", "json", *args])
    return res, json.loads(res.stdout) if res.stdout.strip() else None


def test_every_format_gives_the_same_tags(encoded):
    res, doc = _json([str(p) for p in encoded.values()])
    assert res.exit_code == 0, res.output
    probs = {r["source"].rsplit(".", 1)[1]: np.array(list(r["track"].values()))
             for r in doc["results"]}
    assert set(probs) == set(encoded)
    top = {k: set(np.argsort(-v)[:3]) for k, v in probs.items()}
    # Lossless formats are the same signal; lossy codecs move scores by at most a little.
    np.testing.assert_allclose(probs["wav"], probs["flac"], atol=1e-3)
    for ext in ("ogg", "mp3", "m4a", "opus"):
        np.testing.assert_allclose(probs[ext], probs["wav"], atol=0.05)
        assert len(top[ext] & top["wav"]) >= 2, ext


def test_one_corrupt_file_does_not_stop_the_others(encoded, tmp_path):
    bad = tmp_path / "broken.mp3"
    bad.write_bytes(b"\xff\xfb" + b"garbage" * 100)
    res, doc = _json([str(encoded["wav"]), str(bad), str(encoded["flac"])])
    assert res.exit_code == 1
    assert [r["source"] for r in doc["results"]] == [str(encoded["wav"]), str(encoded["flac"])]
    (error,) = doc["errors"]
    assert error["source"] == str(bad) and error["type"] == "AudioError"
    assert "broken.mp3" in res.stderr and "1 of 3 inputs failed" in res.stderr


def test_json_holds_track_tags_and_taggram(encoded):
    res, doc = _json(["--hop", "1.0", str(encoded["wav"])])
    assert res.exit_code == 0
    (r,) = doc["results"]
    assert len(r["tags"]) == 36 and len(r["track"]) == 36
    assert [w["start_s"] for w in r["windows"]][:3] == [0.0, 1.0, 2.0]
    assert all(len(w["probs"]) == 36 for w in r["windows"])
    assert r["model"]["trained"] is False and "UNTRAINED" in r["warning"]


def test_csv_has_a_track_row_and_window_rows(encoded, tmp_path):
    out = tmp_path / "tags.csv"
    res = runner.invoke(app, ["tag", *MODEL, "-f", "csv", "-o", str(out), str(encoded["wav"])])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert rows[0]["kind"] == "track" and {r["kind"] for r in rows[1:]} == {"window"}
    assert len(rows) == 1 + 3  # 9 s at a 3.69 s hop: 2 full windows + 1 partial
    assert float(rows[1]["rock"]) >= 0


def test_table_and_plot(encoded, tmp_path):
    png = tmp_path / "taggram.png"
    res = runner.invoke(app, ["tag", *MODEL, "--plot", str(png), str(encoded["ogg"])])
    assert res.exit_code == 0, res.output
    assert "UNTRAINED" in res.stdout and "score" in res.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_model_is_a_clear_error(encoded, tmp_path):
    res = runner.invoke(app, ["tag", "--model", str(tmp_path / "x.safetensors"),
                              str(encoded["wav"])])
    assert res.exit_code == 2 and "no such file" in res.stderr


def test_info_and_sizes(tmp_path, debug_model):
    from rtagger.model.checkpoint import save_model

    p = save_model(debug_model, tmp_path / "m.safetensors")
    res = runner.invoke(app, ["info", str(p)])
    assert res.exit_code == 0 and json.loads(res.stdout)["tagger"]["d_model"] == 32


@pytest.mark.slow
def test_python_dash_m_entry_point(encoded):
    proc = subprocess.run([sys.executable, "-m", "rtagger", "tag", *MODEL, "-f", "json",
                           str(encoded["wav"])], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["results"][0]["duration_s"] == pytest.approx(9.0, abs=0.05)
