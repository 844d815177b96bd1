"""MMA's groove library, the GM soundfonts and the tools the synthetic benchmark runs.

``train/data/mma_grooves.csv`` (package data of :mod:`rtagger.train.data`) lists MMA's
groove files with their genres and the one split each belongs to; this module reads it,
finds MMA's library on disk and reads from each groove file its main variations, its beats
per bar and a sensible tempo range. It also finds the soundfonts and runs ``mma`` and
``fluidsynth``; a missing one is reported with the apt packages that provide it.

Needs ``apt-get install mma fluidsynth fluid-soundfont-gm timgm6mb-soundfont``.
"""

from __future__ import annotations

import csv
import importlib.resources
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path

from rtagger.errors import RtaggerError
from rtagger.train.synth.labels import tags_in_group

SPLITS = ("train", "valid", "test")
APT_PACKAGES = ("mma", "fluidsynth", "fluid-soundfont-gm", "timgm6mb-soundfont")
SF2_DIR = Path("/usr/share/sounds/sf2")
# The only soundfonts train and valid songs may use (held-out sets may bring their own).
GM_SOUNDFONTS = {"FluidR3_GM.sf2": "fluid-soundfont-gm", "TimGM6mb.sf2": "timgm6mb-soundfont"}
MMA_LIB_DIRS = (Path("/usr/share/mma/lib"), Path("/usr/local/share/mma/lib"))
MMA_LIB_ENV = "RTAGGER_MMA_LIB"
GROOVES_PACKAGE = "rtagger.train.data"
GROOVES_RESOURCE = "mma_grooves.csv"

# Sensible tempo (MMA beats per minute) per genre; some genres set the feel on their own.
GENRE_TEMPO_BPM = {
    "rock": (100, 150), "pop": (88, 128), "jazz": (90, 200), "blues": (70, 130),
    "country": (90, 150), "latin": (90, 140), "electronic": (110, 140), "funk": (88, 120),
    "reggae": (70, 110), "metal": (100, 180), "hiphop": (75, 100), "folk": (80, 130),
    "gospel": (65, 110), "ballad": (58, 86), "waltz": (90, 180), "march": (100, 130),
}
DOMINANT_TEMPO_GENRES = ("ballad", "hiphop", "march", "waltz")
NAME_TEMPO_BPM = {  # checked in order on the file and groove names (lower case)
    "dnb": (160, 176), "ambient": (70, 100), "trip": (70, 95), "ska": (120, 165),
}
SIX_BEAT_TEMPO_BPM = (96, 150)  # 6/8 grooves: MMA counts eighths as its beats
_MMA_TIME_SIGS = {"2/2": 4, "2/4": 2, "6/4": 6, "6/8": 6, "3/2": 6, "3/4": 3, "3/8": 1.5,
                  "9/8": 4.5, "4/4": 4, "12/8": 6, "common": 4, "cut": 4}
_NON_MAIN_GROOVE = re.compile(r"intro|fill|break|metronome", re.IGNORECASE)
_ENDING_GROOVE = re.compile(r"End|END|end\d*$")  # case matters: "DescendingJazz" is main
_PFLIB_NON_MAIN = re.compile(r"(fa|fb|e)$", re.IGNORECASE)  # pflib: fills A/B and ending


class SynthError(RtaggerError):
    """The synthetic benchmark cannot be built (missing tool, bad option, failed render)."""


# --- Grooves ------------------------------------------------------------------------------
@dataclass(frozen=True)
class GrooveFile:
    """One row of ``train/data/mma_grooves.csv``: an MMA groove file and its labels."""

    library: str
    file: str
    genres: tuple[str, ...]
    split: str

    @property
    def key(self) -> str:
        return f"{self.library}/{self.file}"

    @property
    def stem(self) -> str:
        return self.file.removesuffix(".mma")


@lru_cache(maxsize=1)
def _all_groove_files() -> tuple[GrooveFile, ...]:
    text = (importlib.resources.files(GROOVES_PACKAGE) / GROOVES_RESOURCE).read_text(
        encoding="utf-8")
    genre_tags = set(tags_in_group("genre"))
    rows = []
    for row in csv.DictReader(text.splitlines()):
        genres = tuple(row["genres"].split())
        if row["split"] not in SPLITS or not genres or set(genres) - genre_tags:
            raise SynthError(f"mma_grooves.csv: bad row {row}")
        rows.append(GrooveFile(row["library"], row["file"], genres, row["split"]))
    return tuple(rows)


def groove_files(split: str | None = None) -> list[GrooveFile]:
    """The groove files of ``split`` (all of them for None), in CSV order."""
    if split is not None and split not in SPLITS:
        raise SynthError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    return [g for g in _all_groove_files() if split is None or g.split == split]


def mma_lib_dir() -> Path:
    """MMA's groove library folder ($RTAGGER_MMA_LIB, else the Debian/pip install place)."""
    env = os.environ.get(MMA_LIB_ENV)
    for cand in ([Path(env)] if env else []) + list(MMA_LIB_DIRS):
        if (cand / "stdlib").is_dir():
            return cand
    raise SynthError(
        f"MMA's groove library not found in {', '.join(map(str, MMA_LIB_DIRS))}; "
        f"{install_hint()} (or point {MMA_LIB_ENV} at the lib folder)"
    )


@cache
def _groove_source(key: str) -> str:
    path = mma_lib_dir() / key
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        raise SynthError(f"cannot read MMA groove file {path}: {err}") from err


def groove_names(gf: GrooveFile) -> tuple[str, ...]:
    """The groove's main variations (DefGroove names without intros, fills and endings)."""
    names = []
    for line in _groove_source(gf.key).splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].lower() == "defgroove":
            name = parts[1]
            if _NON_MAIN_GROOVE.search(name) or _ENDING_GROOVE.search(name):
                continue
            if gf.library == "pflib" and _PFLIB_NON_MAIN.search(name):
                continue
            names.append(name)
    if not names:
        raise SynthError(f"{gf.key}: no main groove defined (DefGroove)")
    return tuple(dict.fromkeys(names))


def is_drum_only(gf: GrooveFile) -> bool:
    """True when the groove file defines drum tracks only (the zoom drum-machine library)."""
    source = _groove_source(gf.key)
    tracks = re.findall(r"^\s*Begin\s+(\S+)", source, re.MULTILINE | re.IGNORECASE)
    tracks = [t.lower() for t in tracks if t.lower() != "doc"]
    return bool(tracks) and all(t.startswith("drum") for t in tracks)


def beats_per_bar(gf: GrooveFile) -> float:
    """MMA beats (quarter notes) per bar from the file's first ``Time`` command (4 if none)."""
    match = re.search(r"^\s*Time\s+(\S+)", _groove_source(gf.key), re.MULTILINE | re.IGNORECASE)
    if not match:
        return 4.0
    value = match.group(1).lower()
    if value in _MMA_TIME_SIGS:
        return float(_MMA_TIME_SIGS[value])
    try:
        return float(value)
    except ValueError:
        return 4.0


def tempo_range_bpm(gf: GrooveFile, groove: str) -> tuple[int, int]:
    """A sensible MMA tempo range for a groove, from its genres and name hints."""
    names = f"{gf.stem} {groove}".lower()
    dominant = [g for g in DOMINANT_TEMPO_GENRES if g in gf.genres]
    if dominant:
        lo, hi = GENRE_TEMPO_BPM[dominant[0]]
    else:
        ranges = [GENRE_TEMPO_BPM[g] for g in gf.genres]
        lo, hi = max(r[0] for r in ranges), min(r[1] for r in ranges)
        if lo >= hi:
            lo, hi = ranges[0]
    for hint, rng in NAME_TEMPO_BPM.items():
        if hint in names:
            lo, hi = rng
            break
    if beats_per_bar(gf) == 6:
        lo, hi = SIX_BEAT_TEMPO_BPM
    if "fast" in names or "quick" in names:
        lo = max(lo, 145)
        hi = min(240, max(hi, lo + 40))
    elif "slow" in names:
        hi = min(hi, 84)
        lo = min(lo, hi - 24)
    return lo, hi


# --- Soundfonts and tools -----------------------------------------------------------------
def default_soundfonts() -> list[Path]:
    return [SF2_DIR / name for name in sorted(GM_SOUNDFONTS)]


def check_soundfonts(split: str, soundfonts: Sequence[str | Path] | None) -> list[Path]:
    """The soundfonts of a build, sorted (default: the GM ones); train/valid take no other."""
    fonts = [Path(s) for s in soundfonts] if soundfonts else default_soundfonts()
    if split in ("train", "valid"):
        foreign = [str(f) for f in fonts if f.name not in GM_SOUNDFONTS]
        if foreign:
            raise SynthError(
                f"{split} songs only use {' and '.join(sorted(GM_SOUNDFONTS))}; "
                f"--soundfont {', '.join(foreign)} is for held-out (test) sets"
            )
    return sorted(fonts, key=str)


def install_hint() -> str:
    return (
        f"install with: sudo apt-get install -y --no-install-recommends {' '.join(APT_PACKAGES)}"
        " && sudo mma -G"
    )


def run_tool(cmd: list[str], timeout_s: float, what: str, cwd: Path | None = None) -> None:
    """Run ``cmd``; a missing program, a time-out or a failure raise :class:`SynthError`."""
    env = dict(os.environ, PYTHONHASHSEED="0")  # MMA is Python: keep its output repeatable
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except FileNotFoundError as err:
        raise SynthError(f"{what}: {cmd[0]} not found; {install_hint()}") from err
    except subprocess.TimeoutExpired as err:
        raise SynthError(f"{what}: {cmd[0]} ran longer than {timeout_s:.0f} s") from err
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise SynthError(f"{what}: {cmd[0]} exited with {proc.returncode}: {' | '.join(tail)}")


def check_tools(soundfonts: Sequence[str | Path] | None = None) -> None:
    """Raise :class:`SynthError` naming the apt packages when MMA/FluidSynth/fonts are missing."""
    missing = [tool for tool in ("mma", "fluidsynth") if shutil.which(tool) is None]
    for font in [Path(s) for s in soundfonts] if soundfonts else default_soundfonts():
        if font.is_file():
            continue
        if font.name not in GM_SOUNDFONTS:
            raise SynthError(f"soundfont {font} not found")
        missing.append(f"{font} (package {GM_SOUNDFONTS[font.name]})")
    if missing:
        raise SynthError(f"the synthetic benchmark needs {', '.join(missing)}; {install_hint()}")
    mma_lib_dir()
