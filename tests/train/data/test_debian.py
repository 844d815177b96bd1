"""Fetching the pool's Debian packages without root: unpack, record, resume, refuse."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from rtagger.errors import ConfigError
from rtagger.train.data import debian

pytestmark = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")


def _build_deb(tmp_path, name: str, version: str):
    """A real .deb built with dpkg-deb: one music file and a DEP-5 copyright file."""
    src = tmp_path / f"src-{name}-{version}"
    (src / "DEBIAN").mkdir(parents=True)
    (src / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: {version}\nArchitecture: all\nMaintainer: x <x@x>\n"
        f"Installed-Size: 4\nDescription: test music\n")
    music = src / "usr" / "share" / "games" / name
    music.mkdir(parents=True)
    (music / "theme.ogg").write_bytes(b"OggS" + bytes(64))
    doc = src / "usr" / "share" / "doc" / name
    doc.mkdir(parents=True)
    (doc / "copyright").write_text("Format: dep5\n\nFiles: *\nLicense: GPL-2+\n\n"
                                   "Files: music/*\nLicense: CC-BY-SA-3.0\n")
    deb = tmp_path / f"{name}_{version}_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(src), str(deb)],
                   check=True, capture_output=True)
    return deb


def _apt_download(deb, debs):
    """What `apt-get download` does: the .deb lands in the download folder."""
    return Path(shutil.copy(deb, debs / deb.name))


def test_fetch_unpacks_records_and_resumes(tmp_path, monkeypatch):
    versions = {"demo-music": "1.0-1"}
    monkeypatch.setattr(debian, "_candidate_version", lambda name, env=None: versions[name])

    monkeypatch.setattr(debian, "_download", lambda name, debs, env=None: _apt_download(
        _build_deb(tmp_path, name, versions[name]), debs))
    out = tmp_path / "debian"
    assert debian.fetch_packages(out, ["demo-music"]) == {"demo-music": "fetched"}
    assert (out / "root" / "demo-music" / "usr/share/games/demo-music/theme.ogg").is_file()
    rec = debian.fetched(out)["demo-music"]
    assert rec["version"] == "1.0-1" and rec["licence"] == "GPL-2+"  # Files: *
    copyright = debian.copyright_of(out / "root" / "demo-music", "demo-music")
    assert copyright.for_file("usr/share/games/demo-music/music/theme.ogg") == "CC-BY-SA-3.0"
    assert copyright.for_file("usr/share/games/demo-music/theme.ogg") == "GPL-2+"
    assert len(rec["deb_sha256"]) == 64
    assert debian.fetch_packages(out, ["demo-music"]) == {"demo-music": "present"}
    versions["demo-music"] = "1.1-1"  # a newer version in the archive: fetched again
    assert debian.fetch_packages(out, ["demo-music"]) == {"demo-music": "fetched"}
    assert debian.fetched(out)["demo-music"]["version"] == "1.1-1"
    assert not list((out / "root").glob(".*.tmp"))


def test_one_failing_package_does_not_stop_the_others(tmp_path, monkeypatch):
    def version(name, env=None):
        if name == "gone-music":
            raise ConfigError("package gone-music is not in this machine's apt sources")
        return "2.0"

    monkeypatch.setattr(debian, "_candidate_version", version)
    monkeypatch.setattr(debian, "_download", lambda name, debs, env=None: _apt_download(
        _build_deb(tmp_path, name, "2.0"), debs))
    status = debian.fetch_packages(tmp_path / "d", ["gone-music", "demo-music"])
    assert status["demo-music"] == "fetched" and "not in this machine" in status["gone-music"]


def test_held_out_packages_are_refused_before_anything_runs(tmp_path):
    for name in ("wesnoth-1.16-music", "wesnoth-1.18-music", "hyperrogue-music",
                 "musescore-general-soundfont-lossless"):
        with pytest.raises(ConfigError, match="held out"):
            debian.fetch_packages(tmp_path, [name])
    assert not any(debian.is_held_out(p.name) for p in debian.POOL_PACKAGES)


def test_a_free_form_copyright_file_gives_its_licence_line():
    c = debian.Copyright("Copyright 2004 Someone\n\nLicense:\n\n   GPL version 2 or later\n")
    assert c.for_file("usr/share/games/x/music/a.ogg") == "GPL version 2 or later"
    assert debian.Copyright("no terms here\n").for_file("a.ogg") == "unknown"
