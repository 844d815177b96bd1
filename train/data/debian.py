"""Debian soundtrack packages for the unlabelled pool: fetched and unpacked without root.

``rtagger data debian --out data/debian`` runs ``apt-get download`` for every package of
:data:`POOL_PACKAGES` (or those named), unpacks each ``.deb`` with ``dpkg-deb -x`` into
``data/debian/root/<package>/`` and records, per package, its version, the licence its
``copyright`` file states for the files and the SHA-256 of the ``.deb`` in
``data/debian/packages.jsonl``. Resumable: a package already unpacked at the same version
is skipped; one that fails to download or unpack is reported and the others go on. Nothing
needs root, and the system's own installed packages are left alone.

The pool (:mod:`rtagger.train.data.pool`) then reads each package's music from there (or
from ``/`` when the package is installed), with package, version and licence on every
track. Packages reserved for held-out evaluation are refused by name.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from rtagger.errors import ConfigError
from rtagger.jsonl import JsonlAppender, read_records

log = logging.getLogger(__name__)

# Packages kept for held-out evaluation of rtagger's models: never in a pool or training set.
HELD_OUT_PACKAGES = frozenset({
    "planetblupi-music-ogg", "planetblupi-music-midi", "nexuiz-music", "wesnoth-1.16-music",
    "fretsonfire-songs-muldjord", "fretsonfire-songs-sectoid", "hyperrogue-music",
    "musescore-general-soundfont", "musescore-general-soundfont-lossless",
    "musescore-general-soundfont-small",
})
_HELD_OUT_PREFIXES = ("musescore-general-soundfont", "wesnoth")  # any wesnoth music too


@dataclass(frozen=True)
class PoolPackage:
    """A Debian package with music for the pool: where its music sits, and what kind it is."""

    name: str
    globs: tuple[str, ...]  # relative to the package's root (its files as installed)
    kind: str  # the style of its music, for the pool report (orchestral, electronic, ...)


POOL_PACKAGES: tuple[PoolPackage, ...] = (
    PoolPackage("warzone2100-music", ("usr/share/games/warzone2100/music",), "orchestral"),
    PoolPackage("ufoai-music", ("usr/share/games/ufoai/base/0music.pk3",), "orchestral"),
)


def is_held_out(name: str) -> bool:
    return name in HELD_OUT_PACKAGES or name.startswith(_HELD_OUT_PREFIXES)


def check_not_held_out(name: str) -> None:
    if is_held_out(name):
        raise ConfigError(f"{name} is held out for evaluating rtagger's models; it must not "
                          f"go into a training pool")


def package(name: str) -> PoolPackage | None:
    return next((p for p in POOL_PACKAGES if p.name == name), None)


def root_of(name: str, debian_dir: str | Path) -> Path | None:
    """Where ``name``'s files are: unpacked under ``debian_dir``, else installed under ``/``."""
    unpacked = Path(debian_dir) / "root" / name
    if unpacked.is_dir():
        return unpacked
    pkg = package(name)
    if pkg is not None and any(any(Path("/").glob(g)) for g in pkg.globs):
        return Path("/")
    return None


def fetched(debian_dir: str | Path) -> dict[str, dict]:
    """Package name -> its record (version, licence, deb sha256) from ``packages.jsonl``."""
    return {r["package"]: r for _, r in read_records(Path(debian_dir) / "packages.jsonl")}


class Copyright:
    """A package's ``copyright`` file, read as DEP-5: which licence covers which file.

    Patterns name paths of the source tree, which differ from the installed paths, so a
    file matches a pattern by its tail (``*/`` + pattern) or, for a pattern without
    wildcards, by its name. As DEP-5 says, the last matching ``Files`` paragraph wins; a
    file no paragraph names gets the ``Files: *`` licence. A file that is not DEP-5 gives
    its first line that mentions a licence, for every file.
    """

    def __init__(self, text: str) -> None:
        self.paragraphs: list[tuple[list[str], str]] = []
        for para in re.split(r"\n\s*\n", text):
            files = re.search(r"^Files:(.*(?:\n[ \t].*)*)", para, re.MULTILINE)
            licence = re.search(r"^License:\s*(.+)$", para, re.MULTILINE)
            if files and licence:
                self.paragraphs.append((files.group(1).split(), licence.group(1).strip()))
        self.fallback = None
        if not self.paragraphs:
            self.fallback = next((ln.strip()[:120] for ln in text.splitlines() if re.search(
                r"licen[cs]e|GPL|Creative Commons", ln, re.IGNORECASE)), "unknown")

    def for_file(self, path: str) -> str:
        if self.fallback is not None:
            return self.fallback
        name = path.rsplit("/", 1)[-1]
        found = "unknown"
        for patterns, licence in self.paragraphs:
            for pat in patterns:
                exact = not any(c in pat for c in "*?[")
                if (fnmatch.fnmatchcase(path, pat) or fnmatch.fnmatchcase(path, "*/" + pat)
                        or (exact and pat.rsplit("/", 1)[-1] == name)):
                    found = licence
        return found


def copyright_of(root: Path, name: str) -> Copyright:
    """The package's parsed ``usr/share/doc/<name>/copyright`` (``unknown`` if absent)."""
    path = root / "usr" / "share" / "doc" / name / "copyright"
    text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
    return Copyright(text)


def licence_of(root: Path, name: str) -> str:
    """The package's main licence: that of ``Files: *`` (or the fallback line)."""
    return copyright_of(root, name).for_file("*")


def fetch_packages(out_dir: str | Path, names: list[str] | None = None) -> dict[str, str]:
    """Download and unpack ``names`` (default: every pool package). Returns name -> status
    (``fetched``, ``present`` or the reason it failed)."""
    out = Path(out_dir)
    debs, roots = out / "debs", out / "root"
    debs.mkdir(parents=True, exist_ok=True)
    roots.mkdir(parents=True, exist_ok=True)
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise ConfigError(f"{tool} is needed to fetch Debian packages (a Debian system)")
    names = names or [p.name for p in POOL_PACKAGES]
    for n in names:
        check_not_held_out(n)
    done = fetched(out)
    status: dict[str, str] = {}
    with JsonlAppender(out / "packages.jsonl", durable=True) as records:
        for name in names:
            try:
                version = _candidate_version(name)
                if name in done and done[name]["version"] == version \
                        and (roots / name).is_dir():
                    status[name] = "present"
                    continue
                deb = _download(name, debs)
                root = roots / name
                if root.exists():
                    shutil.rmtree(root)
                tmp = roots / f".{name}.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                _run(["dpkg-deb", "-x", str(deb), str(tmp)], f"unpacking {deb.name}")
                tmp.rename(root)  # a package is unpacked whole or not at all
                records.write({
                    "package": name, "version": _deb_field(deb, "Version"),
                    "licence": licence_of(root, name), "deb": deb.name,
                    "deb_sha256": _sha256(deb), "installed_size_kb": int(
                        _deb_field(deb, "Installed-Size") or 0)})
                status[name] = "fetched"
            except ConfigError as e:
                log.error("%s: %s", name, e)
                status[name] = str(e)
    return status


def _candidate_version(name: str) -> str:
    out = _run(["apt-cache", "policy", name], f"looking up {name}")
    m = re.search(r"Candidate:\s*(\S+)", out)
    if not m or m.group(1) == "(none)":
        raise ConfigError(f"package {name} is not in this machine's apt sources "
                          f"(apt-get update?)")
    return m.group(1)


def _download(name: str, debs: Path) -> Path:
    before = set(debs.glob(f"{name}_*.deb"))
    _run(["apt-get", "download", name], f"downloading {name}", cwd=debs)
    found = sorted(set(debs.glob(f"{name}_*.deb")) - before) or sorted(debs.glob(f"{name}_*.deb"))
    if not found:
        raise ConfigError(f"apt-get download {name} left no .deb")
    return found[-1]


def _deb_field(deb: Path, field: str) -> str:
    return _run(["dpkg-deb", "-f", str(deb), field], f"reading {deb.name}").strip()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ConfigError(f"{what}: {e}") from e
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ConfigError(f"{what} failed: {tail[0]}")
    return done.stdout
