"""The one atomic-write idiom: old or new file, never a torn one, no temp files left."""

from __future__ import annotations

import os
import stat

import pytest

from rtagger.atomic import atomic_path, atomic_write


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "shard-00000.npz"
    atomic_write(target, b"old")
    with pytest.raises(RuntimeError, match="killed"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half of the new")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.npz"]


def test_text_bytes_folders_and_permissions(tmp_path):
    target = tmp_path / "new" / "folder" / "meta.json"
    assert atomic_write(target, "{\"é\": 1}") == target
    assert target.read_text(encoding="utf-8") == "{\"é\": 1}"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o644  # shared files, not owner-only
    with atomic_path(tmp_path / "x.bin", mode=0o600) as tmp:
        assert tmp.name.startswith(".x.bin.") and tmp.suffix == ".tmp"  # never globbed
        tmp.write_bytes(b"\x00")
    assert stat.S_IMODE(os.stat(tmp_path / "x.bin").st_mode) == 0o600
