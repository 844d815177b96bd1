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
    members: tuple[str, ...] = ()  # zip archives: only the members matching these patterns
    suite: str = ""  # a Debian suite other than this machine's (e.g. "trixie"), or ""


# Debian 12 (bookworm) main, free licences, music only (sound effects, speech and ambience
# folders left out; tracks of 30 s or more were measured when the list was made). Hours are
# those measured then (ffprobe, 2026-12-02); `rtagger data pool` reports what it finds.
POOL_PACKAGES: tuple[PoolPackage, ...] = (
    PoolPackage("warzone2100-music", ("usr/share/games/warzone2100/music",), "orchestral"),
    PoolPackage("ufoai-music", ("usr/share/games/ufoai/base/0music.pk3",), "orchestral"),
    # Archives that mix music with effects: only their music members.
    PoolPackage("0ad-data", ("usr/share/games/0ad/mods/public/public.zip",), "world",
                members=("audio/music/*.ogg",)),  # 2.92 h
    PoolPackage("openarena-088-data", ("usr/share/games/openarena/baseoa/pak6-patch088.pk3",),
                "electronic", members=("music/*.ogg",)),  # 0.19 h
    # Debian 13 (trixie): free licences, not in bookworm.
    PoolPackage("openrct2-openmsx", ("usr/share/openrct2/object/official/music/*.parkobj",
                                     "usr/share/openrct2/object/official/audio/*.parkobj",
                                     "usr/share/openrct2/assetpack/*.parkap"),
                "mixed", members=("*.ogg",), suite="trixie"),  # 2.20 h
    PoolPackage("taisei-data", ("usr/share/taisei/00-taisei.zip",), "electronic",
                members=("bgm/*.opus",), suite="trixie"),  # 0.73 h
    PoolPackage("naev-data", ("usr/share/naev/dat/snd/music/*.ogg",), "electronic"),  # 2.11 h
    PoolPackage("supertux-data", ("usr/share/games/supertux2/music/*/*.ogg",), "mixed"),  # 1.62 h
    PoolPackage("hedgewars-data", (  # 1.56 h
        "usr/share/games/hedgewars/Data/Music/*.ogg",
    ), kind="world"),
    PoolPackage("widelands-data", (  # 1.55 h
        "usr/share/games/widelands/data/music/*.ogg",
    ), kind="orchestral"),
    PoolPackage("blobwars-data", ("usr/share/games/blobwars/music/*",), "electronic"),  # 1.27 h
    PoolPackage("berusky2-data", ("usr/share/games/berusky2/music/*.ogg",), "electronic"),  # 1.19 h
    PoolPackage("colobot-common-sounds", (  # 1.09 h
        "usr/share/games/colobot/music/*.ogg",
    ), kind="orchestral"),
    PoolPackage("singularity-music", (  # 1.07 h
        "usr/share/games/singularity/music/*.ogg",
        "usr/share/games/singularity/music/*/*.ogg",
    ), kind="ambient"),
    PoolPackage("marsshooter-data", (  # 0.98 h
        "usr/share/games/marsshooter/audio/music/*.ogg",
        "usr/share/games/marsshooter/audio/menu.ogg",
        "usr/share/games/marsshooter/audio/tutorial.ogg",
    ), kind="rock"),
    PoolPackage("supertuxkart-data", (  # 0.97 h
        "usr/share/games/supertuxkart/data/music/*.ogg",
    ), kind="pop"),
    PoolPackage("freedroidrpg-data", (  # 0.85 h
        "usr/share/freedroidrpg/data/sound/music/*.ogg",
        "usr/share/freedroidrpg/data/base/titles/*.ogg",
        "usr/share/freedroidrpg/data/storyline/*/titles/*.ogg",
    ), kind="electronic"),
    PoolPackage("unknown-horizons", (  # 0.71 h
        "usr/share/unknown-horizons/content/audio/music/*.ogg",
        "usr/share/unknown-horizons/content/audio/music/*/*.ogg",
    ), kind="orchestral"),
    PoolPackage("flare-game", (  # 0.63 h
        "usr/share/games/flare/mods/fantasycore/music/*.ogg",
    ), kind="orchestral"),
    PoolPackage("trackballs-data", (  # 0.53 h
        "usr/share/games/trackballs/music/*.ogg",
    ), kind="electronic"),
    PoolPackage("redeclipse-data", (  # 0.53 h
        "usr/share/games/redeclipse/data/sounds/music/*.ogg",
        "usr/share/games/redeclipse/data/sounds/theme*.ogg",
        "usr/share/games/redeclipse/data/sounds/original.ogg",
        "usr/share/games/redeclipse/data/maps/*.ogg",
    ), kind="electronic"),
    PoolPackage("pushover-data", ("usr/share/pushover/themes/*.ogg",), "mixed"),  # 0.52 h
    PoolPackage("megaglest-data", (  # 0.51 h
        "usr/share/games/megaglest/data/core/menu/music/*.ogg",
        "usr/share/games/megaglest/techs/megapack/factions/*/music/*.ogg",
    ), kind="world"),
    PoolPackage("starfighter-data", ("usr/share/starfighter/music/*.ogg",), "electronic"),  # 0.47 h
    PoolPackage("warmux-data", ("usr/share/games/warmux/music/*/*.ogg",), "jazz"),  # 0.45 h
    PoolPackage("wizznic-data", (  # 0.43 h
        "usr/share/games/wizznic/packs/*/music/*.ogg",
        "usr/share/games/wizznic/data/menu-music.ogg",
    ), kind="electronic"),
    PoolPackage("openclonk-data", (  # 0.43 h
        "usr/share/games/openclonk/Music.ocg/*.ogg",
    ), kind="orchestral"),
    PoolPackage("fillets-ng-data", (  # 0.40 h
        "usr/share/games/fillets-ng/music/*.ogg",
    ), kind="ambient"),
    PoolPackage("davegnukem-data", (  # 0.39 h
        "usr/share/games/davegnukem/music/*/*.ogg",
    ), kind="chiptune"),
    PoolPackage("enigma-data", ("usr/share/games/enigma/music/*/*.ogg",), "ambient"),  # 0.32 h
    PoolPackage("zaz-data", ("usr/share/games/zaz/*.ogg",), "mixed"),  # 0.30 h
    PoolPackage("asc-music", ("usr/share/games/asc/music/*.mp3",), "rock"),  # 0.29 h
    PoolPackage("freecol", (  # 0.28 h
        "usr/share/games/freecol/default/resources/music/*/*.ogg",
        "usr/share/games/freecol/base/resources/sound/intro.ogg",
    ), kind="orchestral"),
    PoolPackage("freedink-data", ("usr/share/games/dink/dink/Sound/*.ogg",), "mixed"),  # 0.26 h
    PoolPackage("wordwarvi-sound", ("usr/share/wordwarvi/sounds/*.ogg",), "electronic"),  # 0.24 h
    PoolPackage("lordsawar-data", (  # 0.22 h
        "usr/share/games/lordsawar/music/*.ogg",
    ), kind="orchestral"),
    PoolPackage("adonthell-data", (  # 0.22 h
        "usr/share/games/adonthell/games/wastesedge/audio/*.ogg",
    ), kind="orchestral"),
    PoolPackage("frozen-bubble-data", (  # 0.20 h
        "usr/share/games/frozen-bubble/snd/*.ogg",
    ), kind="mixed"),
    PoolPackage("xmoto-data", (  # 0.19 h
        "usr/share/games/xmoto/Textures/Musics/*.ogg",
    ), kind="electronic"),
    PoolPackage("btanks-data", (  # 0.19 h
        "usr/share/games/btanks/data/tunes/*.ogg",
    ), kind="electronic"),
    PoolPackage("freeorion-data", (  # 0.17 h
        "usr/share/games/freeorion/default/data/sound/*.ogg",
    ), kind="orchestral"),
    PoolPackage("noiz2sa-data", (  # 0.17 h
        "usr/share/games/noiz2sa/sounds/stg*.ogg",
    ), kind="electronic"),
    PoolPackage("hex-a-hop-data", (  # 0.16 h
        "usr/share/games/hex-a-hop/hex-a-hop/music*.ogg",
    ), kind="mixed"),
    PoolPackage("lincity-ng-data", (  # 0.16 h
        "usr/share/games/lincity-ng/music/*/*.ogg",
    ), kind="mixed"),
    PoolPackage("neverball-common", ("usr/share/games/neverball/bgm/*.ogg",), "mixed"),  # 0.15 h
    PoolPackage("amoebax-data", ("usr/share/games/amoebax/music/*.ogg",), "mixed"),  # 0.15 h
    PoolPackage("pinball-table-gnu-data", (  # 0.15 h
        "usr/share/games/pinball/gnu/music.ogg",
    ), kind="mixed"),
    PoolPackage("extremetuxracer-data", ("usr/share/games/etr/music/*.ogg",), "mixed"),  # 0.14 h
    PoolPackage("plee-the-bear-data", (  # 0.14 h
        "usr/share/games/plee-the-bear/music/*.ogg",
    ), kind="mixed"),
    PoolPackage("powermanga-data", (  # 0.12 h
        "usr/share/games/powermanga/sound/handheld_console/music_*.ogg",
    ), kind="mixed"),
    PoolPackage("gigalomania-data", ("usr/share/gigalomania/music/*.ogg",), "mixed"),  # 0.10 h
    PoolPackage("torcs-data", ("usr/share/games/torcs/data/music/*.ogg",), "rock"),  # 0.10 h
    PoolPackage("pinball-data", ("usr/share/games/pinball/*/*.ogg",), "mixed"),  # 0.10 h
    PoolPackage("gamine-data", ("usr/share/games/gamine/sounds/Bach*.ogg",), "classical"),  # 0.09 h
    PoolPackage("tuxmath-data", ("usr/share/tuxmath/sounds/*.ogg",), "mixed"),  # 0.09 h
    PoolPackage("scorched3d-data", (  # 0.08 h
        "usr/share/games/scorched3d/data/globalmods/none/data/music/*.ogg",
    ), kind="mixed"),
    PoolPackage("holotz-castle-data", (  # 0.07 h
        "usr/share/games/holotz-castle/game/sound/HC*.wav",
    ), kind="mixed"),
    PoolPackage("mu-cade-data", (  # 0.07 h
        "usr/share/games/mu-cade/sounds/musics/*.ogg",
    ), kind="electronic"),
    PoolPackage("pax-britannica-data", (  # 0.07 h
        "usr/share/pax-britannica/audio/music.ogg",
    ), kind="mixed"),
    PoolPackage("tumiki-fighters-data", (  # 0.07 h
        "usr/share/games/tumiki-fighters/sounds/*.ogg",
    ), kind="electronic"),
    PoolPackage("torus-trooper-data", (  # 0.07 h
        "usr/share/games/torus-trooper/sounds/musics/*.ogg",
    ), kind="electronic"),
    PoolPackage("parsec47-data", (  # 0.07 h
        "usr/share/games/parsec47/sounds/ptn*.ogg",
    ), kind="electronic"),
    PoolPackage("renpy-demo", ("usr/share/games/renpy/demo/game/*.ogg",), "mixed"),  # 0.07 h
    PoolPackage("performous", (  # 0.07 h
        "usr/share/games/performous/themes/default/*.ogg",
    ), kind="mixed"),
    PoolPackage("titanion-data", (  # 0.06 h
        "usr/share/games/titanion/sounds/musics/*.ogg",
    ), kind="electronic"),
    PoolPackage("mazeofgalious-data", (  # 0.06 h
        "usr/share/games/mazeofgalious/sound/jorito/*.ogg",
    ), kind="mixed"),
    PoolPackage("gunroar-data", (  # 0.06 h
        "usr/share/games/gunroar/sounds/musics/*.ogg",
    ), kind="electronic"),
    PoolPackage("searchandrescue-data", (  # 0.06 h
        "usr/share/games/searchandrescue/music/*.wav",
    ), kind="mixed"),
    PoolPackage("brainparty-data", (  # 0.06 h
        "usr/share/games/brainparty/electricity.ogg",
    ), kind="mixed"),
    PoolPackage("a7xpg-data", ("usr/share/games/a7xpg/sounds/bgm*.ogg",), "electronic"),  # 0.06 h
    PoolPackage("hannah-data", ("usr/share/games/hannah/bgm1.ogg",), "mixed"),  # 0.05 h
    PoolPackage("orbital-eunuchs-sniper-data", (  # 0.05 h
        "usr/share/games/orbital_eunuchs_sniper/oes.ogg",
    ), kind="mixed"),
    PoolPackage("cube2-data", ("usr/share/games/cube2/packages/music/*.ogg",), "mixed"),  # 0.05 h
    PoolPackage("blockout2", ("usr/share/games/blockout2/sounds/music.ogg",), "mixed"),  # 0.05 h
    PoolPackage("funnyboat", ("usr/share/games/funnyboat/data/*.ogg",), "mixed"),  # 0.05 h
    PoolPackage("rrootage-data", (  # 0.05 h
        "usr/share/games/rrootage/sounds/stg*.ogg",
    ), kind="electronic"),
    PoolPackage("lugaru-data", ("usr/share/games/lugaru/Sounds/Music*.ogg",), "mixed"),  # 0.05 h
    PoolPackage("pink-pony-data", ("usr/share/games/pink-pony/music/*.mp3",), "mixed"),  # 0.05 h
    PoolPackage("glob2-data", ("usr/share/games/glob2/data/zik/*.ogg",), "mixed"),  # 0.04 h
    PoolPackage("abe-data", ("usr/share/games/abe/sounds/*.ogg",), "mixed"),  # 0.04 h
    PoolPackage("caveexpress-data", (  # 0.03 h
        "usr/share/games/caveexpress/sounds/music-*.ogg",
    ), kind="mixed"),
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
            self.fallback = _licence_line(text)

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


def _licence_line(text: str) -> str:
    """A free-form copyright file's licence: the first line naming one (a bare "License:"
    heading gives the line after it)."""
    lines = [ln.strip() for ln in text.splitlines()]
    for i, ln in enumerate(lines):
        if re.search(r"licen[cs]e|GPL|Creative Commons", ln, re.IGNORECASE):
            if re.fullmatch(r"licen[cs]e:?", ln, re.IGNORECASE):
                ln = next((nxt for nxt in lines[i + 1:] if nxt), "")
            if ln:
                return ln[:120]
    return "unknown"


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
            pkg = package(name)
            env = _suite_env(out, pkg.suite) if pkg is not None and pkg.suite else None
            try:
                version = _candidate_version(name, env)
                if name in done and done[name]["version"] == version \
                        and (roots / name).is_dir():
                    status[name] = "present"
                    continue
                deb = _download(name, debs, env)
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


def _suite_env(out: Path, suite: str) -> dict[str, str]:
    """An APT configuration of our own that sees ``suite`` (main and contrib), so a package
    of another Debian release is downloaded without touching the system's sources."""
    import os

    apt = out / "apt" / suite
    conf = apt / "apt.conf"
    if not conf.is_file():
        (apt / "lists" / "partial").mkdir(parents=True, exist_ok=True)
        (apt / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
        (apt / "sources.list").write_text(
            f"deb [signed-by={keyring}] http://deb.debian.org/debian {suite} main contrib\n")
        conf_text = (f'Dir::Etc::SourceList "{(apt / "sources.list").absolute()}";\n'
                     'Dir::Etc::SourceParts "/nonexistent";\n'
                     f'Dir::State::Lists "{(apt / "lists").absolute()}";\n'
                     f'Dir::Cache "{(apt / "cache").absolute()}";\n')
        (apt / "apt.conf.tmp").write_text(conf_text)
        env = dict(os.environ, APT_CONFIG=str((apt / "apt.conf.tmp").absolute()))
        _run(["apt-get", "update"], f"reading the {suite} package lists", env=env)
        (apt / "apt.conf.tmp").rename(conf)
    return dict(os.environ, APT_CONFIG=str(conf.absolute()))


def _candidate_version(name: str, env: dict[str, str] | None = None) -> str:
    out = _run(["apt-cache", "policy", name], f"looking up {name}", env=env)
    m = re.search(r"Candidate:\s*(\S+)", out)
    if not m or m.group(1) == "(none)":
        raise ConfigError(f"package {name} is not in this machine's apt sources "
                          f"(apt-get update?)")
    return m.group(1)


def _download(name: str, debs: Path, env: dict[str, str] | None = None) -> Path:
    before = set(debs.glob(f"{name}_*.deb"))
    _run(["apt-get", "download", name], f"downloading {name}", cwd=debs, env=env)
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


def _run(cmd: list[str], what: str, cwd: Path | None = None,
         env: dict[str, str] | None = None) -> str:
    try:
        done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ConfigError(f"{what}: {e}") from e
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ConfigError(f"{what} failed: {tail[0]}")
    return done.stdout
