"""The synthetic labelled music benchmark (``rtagger data synth``).

Each song is planned from a seed (groove, tempo, key, chord progression, lead instrument,
structure events), written as an MMA file, turned into MIDI by ``mma``, edited with
:mod:`mido` (lead melody, re-voicing, tempo change, key change, breakdown: see
:mod:`rtagger.train.synth.midi`), rendered by ``fluidsynth`` and stored as 16 kHz mono FLAC.
Tags and the timeline are computed from the edited MIDI that was rendered, never from the plan.

Output folder::

    manifest.jsonl      one JSON object per song (id, path, duration, tags, split, groove,
                        seed, soundfont, timeline, ...), sorted by song index at the end
    audio/<id>.flac     16 kHz mono
    midi/<id>.mid       the MIDI that was rendered (tags can be recomputed from it)
    synth_config.json   the options; resuming with other options is refused
    failures.jsonl      songs that failed every attempt (only when some did)

Builds are deterministic (song ``i`` of split ``s`` with seed ``k`` is always the same),
parallel over processes and resumable: a song is finished once its manifest line is
written, which happens only after its audio and MIDI were renamed from temporary names.

Needs ``apt-get install mma fluidsynth fluid-soundfont-gm timgm6mb-soundfont``.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.resources
import json
import logging
import math
import multiprocessing
import os
import random
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import mido
import numpy as np

from rtagger.atomic import atomic_path, atomic_write
from rtagger.audio.decode import SAMPLE_RATE
from rtagger.audio.encode import write_flac
from rtagger.errors import AudioError, RtaggerError
from rtagger.train.data.jsonl import JsonlAppender, JsonlError, read_records
from rtagger.train.synth import midi as sm
from rtagger.train.synth.midi import window_labels

__all__ = [
    "BuildResult",
    "GrooveFile",
    "SongPlan",
    "SynthError",
    "build_synth",
    "check_tools",
    "groove_files",
    "plan_song",
    "run_build",
    "synthesize_song",
    "window_labels",
]

log = logging.getLogger(__name__)

GENERATOR_VERSION = "synth-v1"  # part of every song seed: bump it when the output changes
SPLITS = ("train", "valid", "test")
RECOMMENDED_SONGS = {"train": 2000, "valid": 300, "test": 500}
APT_PACKAGES = ("mma", "fluidsynth", "fluid-soundfont-gm", "timgm6mb-soundfont")
SF2_DIR = Path("/usr/share/sounds/sf2")
# The only soundfonts train and valid songs may use (held-out sets may bring their own).
GM_SOUNDFONTS = {"FluidR3_GM.sf2": "fluid-soundfont-gm", "TimGM6mb.sf2": "timgm6mb-soundfont"}
MMA_LIB_DIRS = (Path("/usr/share/mma/lib"), Path("/usr/local/share/mma/lib"))
MMA_LIB_ENV = "RTAGGER_MMA_LIB"
GROOVES_RESOURCE = "data/mma_grooves.csv"

# FluidSynth's output rate. At 16 kHz it aliases what it would render above 8 kHz into the
# band; a higher rate (32000: FFmpeg's resampler then low-passes to 16 kHz) cuts the log-mel
# error against a 48 kHz render from ~2.6 to ~1.9 dB but costs 1.6x the CPU (docs/data.md).
DEFAULT_RENDER_RATE_HZ = SAMPLE_RATE
AUDIO_TAIL_S = 2.0  # release/reverb kept after the last MIDI event
FADE_OUT_S = 0.25  # only where the tail is cut, to avoid a click
TARGET_RMS_DBFS = -20.0
PEAK_LIMIT = 0.97
SILENT_RMS = 1e-4  # a render quieter than this (before normalisation) failed
MMA_TIMEOUT_S = 120
FLUIDSYNTH_TIMEOUT_S = 900
SCRATCH_DIR = ".scratch"  # per-song work folders inside the output folder
MAX_ATTEMPTS = 4  # a failing song is retried with a new seed this many times in all

STRUCTURE_PROB = 0.25  # each of key_change, tempo_change, breakdown
MELODY_PROB = 0.85
MELODY_PHRASE_PROB = 0.75  # each 4-bar phrase of the lead is played with this probability
REVOICE_PROB = 0.35  # re-voice one accompaniment part with a program from another family
TWO_CHORD_BAR_PROB = 0.25  # 4-beat bars only

MAJOR_SCALE = (0, 2, 4, 5, 7, 9, 11)
MINOR_SCALE = (0, 2, 3, 5, 7, 8, 10)
QUALITY_INTERVALS = {
    "": (0, 4, 7), "m": (0, 3, 7), "7": (0, 4, 7, 10), "M7": (0, 4, 7, 11),
    "m7": (0, 3, 7, 10), "6": (0, 4, 7, 9), "dim": (0, 3, 6), "m7b5": (0, 3, 6, 10),
}
# degree -> (semitones above the tonic, triad quality, quality with a seventh)
DEGREES = {
    "major": {
        "I": (0, "", "M7"), "ii": (2, "m", "m7"), "iii": (4, "m", "m7"), "IV": (5, "", "M7"),
        "V": (7, "", "7"), "vi": (9, "m", "m7"), "vii": (11, "dim", "m7b5"),
    },
    "minor": {
        "i": (0, "m", "m7"), "ii": (2, "dim", "m7b5"), "III": (3, "", "M7"),
        "iv": (5, "m", "m7"), "v": (7, "m", "m7"), "V": (7, "", "7"), "VI": (8, "", "M7"),
        "VII": (10, "", "7"),
    },
}
TONIC = {"major": "I", "minor": "i"}
# Functional-harmony random walk: weights of the next degree.
NEXT_DEGREE = {
    "major": {
        "I": {"IV": 3, "V": 3, "vi": 3, "ii": 2, "iii": 1},
        "ii": {"V": 4, "IV": 1, "vii": 1},
        "iii": {"vi": 3, "IV": 2},
        "IV": {"V": 3, "I": 2, "ii": 1, "vi": 1},
        "V": {"I": 4, "vi": 2, "IV": 1},
        "vi": {"IV": 3, "ii": 3, "V": 1, "iii": 1},
        "vii": {"I": 3, "iii": 1},
    },
    "minor": {
        "i": {"iv": 3, "VI": 3, "VII": 3, "III": 2, "v": 1, "ii": 1},
        "ii": {"V": 3, "v": 1},
        "III": {"VI": 3, "VII": 2, "iv": 2},
        "iv": {"V": 2, "v": 2, "i": 2, "VII": 2},
        "v": {"i": 3, "VI": 2},
        "V": {"i": 4, "VI": 1},
        "VI": {"VII": 3, "iv": 2, "III": 2, "V": 1},
        "VII": {"III": 3, "i": 3, "VI": 1},
    },
}
CADENCE = {"major": ("V", "IV", "V"), "minor": ("V", "VII", "iv")}
BLUES_12 = ("I", "IV", "I", "I", "IV", "IV", "I", "I", "V", "IV", "I", "V")

# Lead instrument families (bass excluded: a bass lead would only duplicate the groove's)
# with the register centre (MIDI pitch) the melody is written around.
LEAD_FAMILIES: dict[str, tuple[tuple[int, ...], int]] = {
    "piano": (tuple(range(0, 8)), 72),
    "mallets": (tuple(range(8, 16)), 76),
    "organ": (tuple(range(16, 21)), 69),
    "accordion": (tuple(range(21, 24)), 69),
    "guitar": (tuple(range(24, 32)), 64),
    "strings": ((*range(40, 46), *range(48, 52)), 67),
    "choir": (tuple(range(52, 55)), 67),
    "brass": (tuple(range(56, 64)), 67),
    "saxophone": (tuple(range(64, 68)), 67),
    "woodwind": (tuple(range(68, 80)), 74),
    "synth": (tuple(range(80, 96)), 72),
}
MELODY_RANGE_SEMITONES = 9  # each side of the register centre
# Drum-only grooves (the zoom library) get a bass and a chord part from these families.
ACCOMP_FAMILIES = ("accordion", "brass", "guitar", "mallets", "organ", "piano", "strings",
                   "synth")
ACCOMP_STYLES = ("beats", "sustain", "offbeat")
_WHOLE_BAR_DURATION = {2: "2", 3: "2.", 4: "1", 6: "1."}  # MMA note lengths of a full bar

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


# --- Grooves --------------------------------------------------------------------------------
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
    text = (importlib.resources.files("rtagger.train") / GROOVES_RESOURCE).read_text(
        encoding="utf-8")
    genre_tags = set(sm.tags_in_group("genre"))
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
        f"{_install_hint()} (or point {MMA_LIB_ENV} at the lib folder)"
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


# --- Song plans -----------------------------------------------------------------------------
Chord = tuple[int, str]  # (root pitch class, quality key of QUALITY_INTERVALS)


@dataclass(frozen=True)
class SongPlan:
    """Everything decided from the seed before MMA runs (JSON-able with ``asdict``)."""

    id: str
    split: str
    index: int
    base_seed: int
    attempt: int
    song_seed: int
    groove_file: str  # "library/file"
    groove: str  # DefGroove name
    genres: tuple[str, ...]
    beats_per_bar: float
    tempo_bpm: int
    tonic_pc: int
    mode: str
    progression: tuple[tuple[Chord, ...], ...]  # one chord cycle, per bar
    n_bars: int
    target_s: float
    lead_program: int | None
    revoice_program: int | None
    accompaniment: tuple[int, int, str] | None  # drum-only grooves: (bass, chord, style)
    key_change: bool
    tempo_change: bool
    breakdown: bool
    soundfont: str
    min_s: float
    max_s: float


def song_id(split: str, seed: int, index: int) -> str:
    return f"synth-{split}-s{seed}-{index:05d}"


def song_seed(split: str, seed: int, index: int, attempt: int) -> int:
    """A 48-bit seed that depends on nothing but its arguments (not on PYTHONHASHSEED)."""
    text = f"{GENERATOR_VERSION}|{split}|{seed}|{index}|{attempt}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:6], "big")


def _weighted(rng: random.Random, weights: dict[str, int]) -> str:
    keys = sorted(weights)
    return rng.choices(keys, weights=[weights[k] for k in keys])[0]


def _chord(tonic_pc: int, mode: str, degree: str, seventh: bool) -> Chord:
    offset, triad, with_seventh = DEGREES[mode][degree]
    return (tonic_pc + offset) % 12, (with_seventh if seventh else triad)


def random_progression(
    rng: random.Random, tonic_pc: int, mode: str, beats: float, genres: Sequence[str]
) -> tuple[tuple[Chord, ...], ...]:
    """One cycle of chords (per bar), starting on the tonic and ending on a cadence chord."""
    if mode == "major" and "blues" in genres and rng.random() < 0.5:
        return tuple(((_chord(tonic_pc, mode, d, True)[0], "7"),) for d in BLUES_12)
    n_bars = rng.choice((4, 4, 8, 8, 8))
    seventh_prob = 0.6 if "jazz" in genres else 0.25
    degree = TONIC[mode]
    bars: list[tuple[Chord, ...]] = []
    for b in range(n_bars):
        per_bar = 2 if beats == 4 and b > 0 and rng.random() < TWO_CHORD_BAR_PROB else 1
        chords = []
        for k in range(per_bar):
            if b > 0 or k > 0:
                degree = _weighted(rng, NEXT_DEGREE[mode][degree])
            if b == n_bars - 1 and k == per_bar - 1:
                degree = rng.choice(CADENCE[mode])
            chords.append(_chord(tonic_pc, mode, degree, rng.random() < seventh_prob))
        bars.append(tuple(chords))
    # The tonic chord decides the major/minor tag: keep its quality unambiguous.
    tonic_quality = rng.choice(("", "", "M7", "6")) if mode == "major" else rng.choice(("m", "m7"))
    bars[0] = ((tonic_pc, tonic_quality), *bars[0][1:])
    return tuple(bars)


def default_soundfonts() -> list[Path]:
    return [SF2_DIR / name for name in sorted(GM_SOUNDFONTS)]


def _check_soundfonts(split: str, soundfonts: Sequence[str | Path] | None) -> list[Path]:
    fonts = [Path(s) for s in soundfonts] if soundfonts else default_soundfonts()
    if split in ("train", "valid"):
        foreign = [str(f) for f in fonts if f.name not in GM_SOUNDFONTS]
        if foreign:
            raise SynthError(
                f"{split} songs only use {' and '.join(sorted(GM_SOUNDFONTS))}; "
                f"--soundfont {', '.join(foreign)} is for held-out (test) sets"
            )
    return sorted(fonts, key=str)


def plan_song(
    split: str,
    index: int,
    seed: int = 0,
    attempt: int = 0,
    min_s: float = 40.0,
    max_s: float = 120.0,
    soundfonts: Sequence[str | Path] | None = None,
    force_structure: bool = False,
) -> SongPlan:
    """The deterministic plan of song ``index`` of ``split`` (``attempt`` > 0: a retry).

    ``force_structure`` (tests only) asks for all three structure events; they are still
    only tagged when the rules hold in the rendered MIDI.
    """
    if not 0 < min_s <= max_s:
        raise SynthError(f"need 0 < min seconds <= max seconds, got {min_s} and {max_s}")
    files = groove_files(split)
    fonts = _check_soundfonts(split, soundfonts)
    s_seed = song_seed(split, seed, index, attempt)
    rng = random.Random(s_seed)
    gf = rng.choice(files)
    groove = rng.choice(groove_names(gf))
    lo, hi = tempo_range_bpm(gf, groove)
    tempo = rng.randint(lo, hi)
    beats = beats_per_bar(gf)
    mode = rng.choice(("major", "minor"))
    tonic = rng.randrange(12)
    progression = random_progression(rng, tonic, mode, beats, gf.genres)
    target = rng.uniform(min_s, max_s)
    n_bars = max(2, round(target / (beats * 60.0 / tempo)))
    family = rng.choice(sorted(LEAD_FAMILIES))
    lead = rng.choice(LEAD_FAMILIES[family][0]) if rng.random() < MELODY_PROB else None
    revoice_family = rng.choice(sorted(LEAD_FAMILIES))
    revoice = rng.choice(LEAD_FAMILIES[revoice_family][0])
    revoice = revoice if rng.random() < REVOICE_PROB else None
    accompaniment = None
    if is_drum_only(gf):
        bass = rng.randrange(32, 40)  # GM basses
        chord_family = rng.choice(ACCOMP_FAMILIES)
        accompaniment = (bass, rng.choice(LEAD_FAMILIES[chord_family][0]),
                         rng.choice(ACCOMP_STYLES))
    # draw even when forced, so that forcing changes nothing else in the plan
    events = [rng.random() < STRUCTURE_PROB or force_structure for _ in range(3)]
    return SongPlan(
        id=song_id(split, seed, index), split=split, index=index, base_seed=seed,
        attempt=attempt, song_seed=s_seed, groove_file=gf.key, groove=groove,
        genres=gf.genres, beats_per_bar=beats, tempo_bpm=tempo, tonic_pc=tonic, mode=mode,
        progression=progression, n_bars=n_bars, target_s=round(target, 3), lead_program=lead,
        revoice_program=revoice, accompaniment=accompaniment, key_change=events[0],
        tempo_change=events[1], breakdown=events[2], soundfont=str(rng.choice(fonts)),
        min_s=min_s, max_s=max_s,
    )


def chord_name(chord: Chord) -> str:
    return f"{sm.PITCH_NAMES[chord[0]]}{chord[1]}"


def song_chords(plan: SongPlan) -> list[tuple[Chord, ...]]:
    """Chords of every bar: the cycle repeated, the last bar on the tonic."""
    bars = [plan.progression[b % len(plan.progression)] for b in range(plan.n_bars - 1)]
    bars.append((plan.progression[0][0],))
    return bars


def mma_source(plan: SongPlan) -> str:
    """The MMA file of a plan; a ``MidiMark`` before each bar lets us find bar lines."""
    lines = [
        f"// {plan.id} ({GENERATOR_VERSION})",
        f"RndSeed {plan.song_seed % 2**31}",  # MMA's humanising randomness, made repeatable
        f"Groove {plan.groove_file.removesuffix('.mma')}:{plan.groove}",
    ]
    if plan.accompaniment:
        lines += accompaniment_tracks(plan.accompaniment, plan.beats_per_bar)
    lines.append(f"Tempo {plan.tempo_bpm}")  # after Groove: some groove files set a tempo
    for b, chords in enumerate(song_chords(plan)):
        lines.append(f"MidiMark {sm.MARKER_PREFIX}bar:{b}")
        lines.append(" ".join(chord_name(c) for c in chords))
    return "\n".join(lines) + "\n"


def accompaniment_tracks(accompaniment: tuple[int, int, str], beats: float) -> list[str]:
    """MMA bass and chord tracks added to a drum-only groove (programs, chord style)."""
    bass_program, chord_program, style = accompaniment
    n = max(1, int(beats))
    bass = ["1 4 1 90"] + ([f"{n // 2 + 1} 4 5 80"] if n >= 3 else [])
    if style == "sustain" and n in _WHOLE_BAR_DURATION:
        chord = [f"1 {_WHOLE_BAR_DURATION[n]} 75"]
    elif style == "offbeat":
        chord = [f"{b}.5 8 75" for b in range(1, n + 1)]
    else:
        chord = [f"{b} 4 {80 if b % 2 else 68}" for b in range(1, n + 1)]
    return [
        "Begin Bass-Rt", f" Voice {bass_program}", f" Sequence {{{'; '.join(bass)}}}",
        " Octave 3", " Articulate 85", " Volume mf", "End",
        "Begin Chord-Rt", f" Voice {chord_program}", f" Sequence {{{'; '.join(chord)}}}",
        " Octave 5", " Articulate 90", " Volume mp", "End",
    ]


# --- Lead melody ----------------------------------------------------------------------------
def _random_rhythm(rng: random.Random, slots: int, final: bool) -> list[tuple[int, int]]:
    """(start slot, length in slots) of the notes of one bar, in eighth-note slots."""
    notes = []
    pos = 0
    while pos < slots:
        length = min(rng.choice((1, 1, 2, 2, 2, 3, 4)), slots - pos)
        if final and pos + length >= slots - 1:
            length = slots - pos  # phrase ending: hold the last note to the bar line
        if rng.random() > 0.15 or (final and pos + length == slots):
            notes.append((pos, length))
        pos += length
    return notes


def _chord_at(chords: tuple[Chord, ...], pos: int, slots: int) -> Chord:
    # Two chords in a bar split it in halves (MMA spreads a bar's chords evenly).
    return chords[min(len(chords) - 1, pos * len(chords) // max(1, slots))]


def melody_notes(
    plan: SongPlan, bars: Sequence[int], last_tick: int, tpq: int, rng: random.Random
) -> list[tuple[int, int, int, int]]:
    """``(on_tick, off_tick, pitch, velocity)`` of a lead melody over the song's chords."""
    if plan.lead_program is None:
        return []
    family = sm.program_tag(plan.lead_program)
    centre = LEAD_FAMILIES[family][1] if family in LEAD_FAMILIES else 72
    lo, hi = centre - MELODY_RANGE_SEMITONES, centre + MELODY_RANGE_SEMITONES
    steps = MAJOR_SCALE if plan.mode == "major" else MINOR_SCALE
    scale_pcs = {(plan.tonic_pc + s) % 12 for s in steps}
    scale = [p for p in range(lo, hi + 1) if p % 12 in scale_pcs]
    chords = song_chords(plan)
    eighth = max(1, tpq // 2)
    ends = [*bars[1:], last_tick]
    pitch = min(scale, key=lambda p: abs(p - centre))
    notes = []
    for phrase in range(rng.choice((0, 0, 1, 2)), len(bars), 4):
        if rng.random() > MELODY_PHRASE_PROB:
            continue
        motif: list[tuple[int, int]] | None = None
        phrase_bars = range(phrase, min(phrase + 4, len(bars)))
        for b in phrase_bars:
            slots = max(1, (ends[b] - bars[b]) // eighth)
            final = b == phrase_bars[-1]
            if b == phrase + 2 and motif and rng.random() < 0.5 and not final:
                rhythm = motif  # repeat the opening rhythm: phrases sound composed
            else:
                rhythm = _random_rhythm(rng, slots, final)
            motif = motif or rhythm
            for pos, length in rhythm:
                chord = _chord_at(chords[min(b, len(chords) - 1)], pos, slots)
                tones = {(chord[0] + i) % 12 for i in QUALITY_INTERVALS[chord[1]]}
                if pos % 2 == 0 or final:  # on the beat: a chord tone near the last pitch
                    cands = [p for p in range(lo, hi + 1) if p % 12 in tones]
                    weights = [math.exp(-abs(p - pitch) / 3.0) for p in cands]
                    pitch = rng.choices(cands, weights=weights)[0]
                else:  # off the beat: a scale step
                    i = min(range(len(scale)), key=lambda k: abs(scale[k] - pitch))
                    i = min(len(scale) - 1, max(0, i + rng.choice((-2, -1, -1, 1, 1, 2))))
                    pitch = scale[i]
                on = bars[b] + pos * eighth
                off = min(ends[b], on + max(1, int(length * eighth * 0.92)))
                vel = min(127, max(40, 88 + (10 if pos == 0 else 0) + rng.randint(-8, 8)))
                notes.append((on, off, pitch, vel))
    return notes


def add_lead_track(
    midi: mido.MidiFile, notes: Sequence[tuple[int, int, int, int]], program: int
) -> int | None:
    """Add the melody on a channel MMA left free; returns the channel (None: no free one)."""
    used = {m.channel for t in midi.tracks for m in t if not m.is_meta and hasattr(m, "channel")}
    free = [c for c in range(16) if c != sm.DRUM_CHANNEL and c not in used]
    if not free or not notes:
        return None
    ch = free[0]
    events: list[tuple[int, mido.Message]] = [
        (0, mido.Message("control_change", channel=ch, control=0, value=0)),
        (0, mido.Message("control_change", channel=ch, control=32, value=0)),
        (0, mido.Message("program_change", channel=ch, program=program)),
        (0, mido.Message("control_change", channel=ch, control=7, value=100)),
        (0, mido.Message("control_change", channel=ch, control=91, value=40)),
    ]
    for on, off, pitch, vel in notes:
        events.append((on, mido.Message("note_on", channel=ch, note=pitch, velocity=vel)))
        events.append((off, mido.Message("note_off", channel=ch, note=pitch, velocity=0)))
    # note_off sorts before note_on at equal ticks (stable sort on the tick after this key)
    events.sort(key=lambda e: (e[0], e[1].type == "note_on"))
    midi.tracks.append(sm.track_from_abs(events, name="Lead"))
    return ch


# --- MIDI: MMA + edits ----------------------------------------------------------------------
def _run(cmd: list[str], timeout_s: float, what: str, cwd: Path | None = None) -> None:
    env = dict(os.environ, PYTHONHASHSEED="0")  # MMA is Python: keep its output repeatable
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except FileNotFoundError as err:
        raise SynthError(f"{what}: {cmd[0]} not found; {_install_hint()}") from err
    except subprocess.TimeoutExpired as err:
        raise SynthError(f"{what}: {cmd[0]} ran longer than {timeout_s:.0f} s") from err
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise SynthError(f"{what}: {cmd[0]} exited with {proc.returncode}: {' | '.join(tail)}")


@dataclass
class MidiResult:
    midi: mido.MidiFile
    edits: dict[str, Any] = field(default_factory=dict)


def make_midi(plan: SongPlan, workdir: Path) -> MidiResult:
    """Run MMA on the plan and apply the edits; the returned MIDI is what gets rendered."""
    mma_path, raw_path = workdir / "song.mma", workdir / "mma.mid"
    mma_path.write_text(mma_source(plan), encoding="utf-8")
    # relative names: MMA writes the input file name into the MIDI, keep it repeatable
    _run(["mma", "-f", raw_path.name, mma_path.name], MMA_TIMEOUT_S, f"{plan.id} MMA", workdir)
    try:
        midi = mido.MidiFile(raw_path)
    except (OSError, EOFError, ValueError, KeyError) as err:
        raise SynthError(f"{plan.id}: MMA wrote an unreadable MIDI file: {err}") from err
    bars = sm.bar_ticks(midi)
    if len(bars) != plan.n_bars:
        raise SynthError(f"{plan.id}: expected {plan.n_bars} bar marks, MMA wrote {len(bars)}")
    edits: dict[str, Any] = {}
    last = sm.end_tick(midi)
    # One random stream per edit, so that changing one edit does not reshuffle the others.
    rng = {k: random.Random(f"{plan.song_seed}:{k}") for k in ("lead", "voice", "tc", "kc", "bd")}
    if plan.lead_program is not None:
        notes = melody_notes(plan, bars, last, midi.ticks_per_beat, rng["lead"])
        ch = add_lead_track(midi, notes, plan.lead_program)
        edits["lead"] = None if ch is None else {"channel": ch, "program": plan.lead_program}
    if plan.revoice_program is not None:
        programs = {
            m.channel: m.program for t in midi.tracks for m in t
            if m.type == "program_change" and m.channel != sm.DRUM_CHANNEL
        }
        if (edits.get("lead") or {}).get("channel") in programs:
            del programs[edits["lead"]["channel"]]
        # bass parts stay bass: a piano playing the bass line would sound like a mistake
        cands = sorted(c for c, p in programs.items() if sm.program_tag(p) != "bass")
        if cands:
            ch = rng["voice"].choice(cands)
            sm.set_channel_program(midi, ch, plan.revoice_program)
            edits["revoice"] = {"channel": ch, "from": programs[ch], "to": plan.revoice_program}
    if plan.tempo_change:
        edits["tempo_change"] = sm.place_tempo_change(
            midi, bars, rng["tc"], (plan.min_s, plan.max_s)
        )
    if plan.key_change:
        edits["key_change"] = sm.place_key_change(midi, bars, rng["kc"])
    if plan.breakdown:
        edits["breakdown"] = sm.place_breakdown(midi, bars, rng["bd"])
    sm.add_marker(midi, 0, sm.key_marker(plan.tonic_pc, plan.mode))
    return MidiResult(midi, edits)


# --- Audio ----------------------------------------------------------------------------------
def render_audio(
    midi_path: Path, soundfont: str | Path, duration_s: float, workdir: Path,
    render_rate_hz: int = DEFAULT_RENDER_RATE_HZ,
) -> np.ndarray:
    """FluidSynth render -> float32 mono at :data:`SAMPLE_RATE`, RMS-normalised."""
    raw = workdir / "render.f32"
    _run(
        ["fluidsynth", "-ni", "-q", "-T", "raw", "-O", "float", "-r", str(render_rate_hz),
         "-F", str(raw), str(soundfont), str(midi_path)],
        FLUIDSYNTH_TIMEOUT_S, f"{midi_path.name} FluidSynth",
    )
    try:
        stereo = np.fromfile(raw, dtype="<f4")
    except OSError as err:
        raise SynthError(f"FluidSynth output unreadable: {err}") from err
    stereo = stereo[: len(stereo) // 2 * 2].reshape(-1, 2)
    keep = int((duration_s + AUDIO_TAIL_S) * render_rate_hz)
    if len(stereo) > keep:
        stereo = stereo[:keep].copy()
        fade = int(FADE_OUT_S * render_rate_hz)
        stereo[-fade:] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)[:, None]
    mono = _resample_mono(stereo, render_rate_hz)
    rms = float(np.sqrt(np.mean(mono.astype(np.float64) ** 2))) if len(mono) else 0.0
    if rms < SILENT_RMS:
        raise SynthError(f"{midi_path.name}: FluidSynth rendered silence (RMS {rms:.2e})")
    peak = float(np.max(np.abs(mono)))
    gain = min(10 ** (TARGET_RMS_DBFS / 20) / rms, PEAK_LIMIT / peak)
    return (mono * gain).astype(np.float32)


def _resample_mono(stereo: np.ndarray, rate_hz: int) -> np.ndarray:
    import av  # PyAV: FFmpeg's resampler (low-pass + decimation, stereo downmix)

    try:
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(stereo, dtype=np.float32).reshape(1, -1), format="flt",
            layout="stereo",
        )
        frame.sample_rate = rate_hz
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        out = [f.to_ndarray()[0] for f in resampler.resample(frame)]
        out += [f.to_ndarray()[0] for f in resampler.resample(None)]
    except av.FFmpegError as err:
        raise SynthError(f"resampling failed: {err}") from err
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def check_audio_file(path: Path, expected_samples: int) -> float:
    """Decode ``path`` back; it must be 16 kHz mono with every sample. Returns seconds."""
    import av

    try:
        with av.open(str(path), format="flac") as container:
            stream = container.streams.audio[0]
            if stream.rate != SAMPLE_RATE or stream.channels != 1:
                raise SynthError(f"{path}: {stream.rate} Hz, {stream.channels} channels")
            n = sum(frame.samples for frame in container.decode(stream))
    except av.FFmpegError as err:
        raise SynthError(f"{path}: written audio does not decode: {err}") from err
    if n != expected_samples:
        raise SynthError(f"{path}: decoded {n} samples, wrote {expected_samples}")
    return n / SAMPLE_RATE


# --- One song -------------------------------------------------------------------------------
def synthesize_song(
    plan: SongPlan, out_dir: str | Path, render_rate_hz: int = DEFAULT_RENDER_RATE_HZ
) -> dict[str, Any]:
    """Make one song (one attempt): MIDI, audio and its manifest record (not yet written)."""
    out_dir = Path(out_dir)
    audio_rel, midi_rel = f"audio/{plan.id}.flac", f"midi/{plan.id}.mid"
    for sub in ("audio", "midi"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    scratch = out_dir / SCRATCH_DIR  # on the output's disk; emptied when a build starts
    scratch.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{plan.id}-", dir=scratch) as tmp:
        work = Path(tmp)
        result = make_midi(plan, work)
        midi_path = work / "song.mid"
        result.midi.save(midi_path)
        # Tags come from the saved file: exactly the bytes FluidSynth reads.
        rendered = mido.MidiFile(midi_path)
        groove = next(g for g in groove_files(plan.split) if g.key == plan.groove_file)
        info = sm.analyse(rendered)
        tags = sm.tags_from_analysis(info, groove.genres)
        timeline = sm.timeline_from_analysis(info)
        samples = render_audio(midi_path, plan.soundfont, timeline["duration"], work,
                               render_rate_hz)
        with atomic_path(out_dir / midi_rel) as part:
            shutil.copyfile(midi_path, part)
        with atomic_path(out_dir / audio_rel) as part:
            try:
                write_flac(part, samples)
            except AudioError as err:
                raise SynthError(str(err)) from err
            seconds = check_audio_file(part, len(samples))
    return {
        "id": plan.id,
        "path": audio_rel,
        "duration": round(seconds, 3),
        "tags": tags,
        "split": plan.split,
        # groove as "artist": the shared leakage check then proves no groove crosses splits
        "artist": f"mma:{plan.groove_file}",
        "groove": plan.groove_file,
        "groove_name": plan.groove,
        "seed": plan.song_seed,
        "base_seed": plan.base_seed,
        "index": plan.index,
        "attempt": plan.attempt,
        "soundfont": Path(plan.soundfont).name,
        "tempo_bpm": plan.tempo_bpm,
        "key": f"{sm.PITCH_NAMES[plan.tonic_pc]} {plan.mode}",
        "chords": " | ".join(" ".join(chord_name(c) for c in bar) for bar in plan.progression),
        "edits": _jsonable(result.edits),
        "midi": midi_rel,
        "generator": GENERATOR_VERSION,
        "timeline": timeline,
    }


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


@dataclass(frozen=True)
class _Job:
    out_dir: str
    split: str
    index: int
    seed: int
    min_s: float
    max_s: float
    soundfonts: tuple[str, ...]
    force_structure: bool
    render_rate_hz: int


def _song_worker(job: _Job) -> tuple[int, dict[str, Any] | None, list[str]]:
    """Make song ``job.index``, retrying with new seeds; never raises."""
    problems = []
    for attempt in range(MAX_ATTEMPTS):
        plan = None
        try:
            plan = plan_song(job.split, job.index, job.seed, attempt, job.min_s, job.max_s,
                             job.soundfonts, job.force_structure)
            return job.index, synthesize_song(plan, job.out_dir, job.render_rate_hz), problems
        except SynthError as err:
            where = f"{plan.groove_file}:{plan.groove}" if plan else "planning"
            problems.append(f"attempt {attempt} ({where}): {err}")
        except Exception as err:  # one song's bug must not end a long build
            where = f"{plan.groove_file}:{plan.groove}" if plan else "planning"
            problems.append(f"attempt {attempt} ({where}): unexpected {type(err).__name__}: {err}")
    return job.index, None, problems


# --- The build ------------------------------------------------------------------------------
@dataclass
class BuildResult:
    """What :func:`run_build` did."""

    manifest: Path
    rendered: int = 0  # songs made by this run
    skipped: int = 0  # songs already in the manifest
    failed: list[tuple[int, str]] = field(default_factory=list)
    audio_s: float = 0.0  # seconds of audio made by this run
    wall_s: float = 0.0

    @property
    def songs_per_min(self) -> float:
        return 60.0 * self.rendered / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def realtime_factor(self) -> float:
        return self.audio_s / self.wall_s if self.wall_s > 0 else 0.0


def _install_hint() -> str:
    return (
        f"install with: sudo apt-get install -y --no-install-recommends {' '.join(APT_PACKAGES)}"
        " && sudo mma -G"
    )


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
        raise SynthError(f"the synthetic benchmark needs {', '.join(missing)}; {_install_hint()}")
    mma_lib_dir()


def _read_done(manifest: Path) -> dict[int, dict[str, Any]]:
    """Finished songs by index: records whose audio file is there."""
    try:
        records = read_records(manifest)
    except JsonlError as err:
        raise SynthError(str(err)) from err
    return {int(rec["index"]): rec for _, rec in records
            if (manifest.parent / rec["path"]).is_file()}


def _check_config(out_dir: Path, config: dict[str, Any]) -> None:
    path = out_dir / "synth_config.json"
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old != config:
            diff = {k: (old.get(k), v) for k, v in config.items() if old.get(k) != v}
            raise SynthError(
                f"{out_dir} holds a build made with other options {diff} (old, new): "
                "use another --out folder or the same options"
            )
    else:
        path.write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")


def run_build(
    out_dir: str | Path,
    split: str,
    n_songs: int,
    seed: int = 0,
    jobs: int | None = None,
    min_s: float = 40.0,
    max_s: float = 120.0,
    soundfonts: Sequence[str | Path] | None = None,
    progress: bool = True,
    *,
    force_structure: bool = False,
    render_rate_hz: int = DEFAULT_RENDER_RATE_HZ,
) -> BuildResult:
    """Build (or finish) songs ``0..n_songs-1`` of ``split``; see :func:`build_synth`."""
    if n_songs < 0:
        raise SynthError(f"--songs must be >= 0, got {n_songs}")
    if not SAMPLE_RATE <= render_rate_hz <= 96_000:
        raise SynthError(f"render rate must be {SAMPLE_RATE}-96000 Hz, got {render_rate_hz}")
    fonts = _check_soundfonts(split, soundfonts)
    check_tools(fonts)
    plan_song(split, 0, seed, 0, min_s, max_s, fonts)  # option errors before any work
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_config(out, {
        "generator": GENERATOR_VERSION, "split": split, "seed": seed, "min_s": min_s,
        "max_s": max_s, "soundfonts": [str(f) for f in fonts],
        "force_structure": force_structure, "render_rate_hz": render_rate_hz,
    })
    for stale in [*out.glob("audio/.*.tmp"), *out.glob("midi/.*.tmp")]:
        stale.unlink()  # left by a killed build (atomic_path temporaries)
    shutil.rmtree(out / SCRATCH_DIR, ignore_errors=True)
    manifest = out / "manifest.jsonl"
    done = _read_done(manifest)
    todo = [i for i in range(n_songs) if i not in done]
    result = BuildResult(manifest, skipped=n_songs - len(todo))
    jobs = max(1, jobs or os.cpu_count() or 1)
    job_args = [
        _Job(str(out), split, i, seed, min_s, max_s, tuple(map(str, fonts)), force_structure,
             render_rate_hz)
        for i in todo
    ]
    start = time.perf_counter()
    with JsonlAppender(manifest, durable=True) as f, _progress(progress) as bar:
        task = bar.add_task(f"synth {split}", total=n_songs, completed=result.skipped)

        def finish(index: int, record: dict[str, Any] | None, problems: list[str]) -> None:
            for msg in problems:
                log.warning("song %d: %s", index, msg)
            if record is None:
                result.failed.append((index, "; ".join(problems)))
                log.error("song %d failed %d attempts; left out", index, MAX_ATTEMPTS)
            else:
                f.write(record)  # on disk before the song counts as done
                done[index] = record
                result.rendered += 1
                result.audio_s += record["duration"]
            bar.advance(task)

        if jobs == 1 or len(job_args) <= 1:
            for job in job_args:
                finish(*_song_worker(job))
        else:
            # spawn: no fork of a process that runs the progress bar's thread
            ctx = multiprocessing.get_context("spawn")
            pool = ProcessPoolExecutor(max_workers=min(jobs, len(job_args)), mp_context=ctx)
            try:
                futures = [pool.submit(_song_worker, job) for job in job_args]
                for fut in as_completed(futures):
                    finish(*fut.result())
            except BaseException:
                # Ctrl-C: drop the queued songs instead of waiting for the whole build
                pool.shutdown(wait=False, cancel_futures=True)
                raise
            pool.shutdown()
    result.wall_s = time.perf_counter() - start
    _finalise(out, manifest, done, result.failed)
    return result


def _progress(enabled: bool) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(),
        MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled,
    )


def _finalise(
    out: Path, manifest: Path, done: dict[int, dict], failed: list[tuple[int, str]]
) -> None:
    # Sorted by index, so that two builds with the same options give the same manifest.
    atomic_write(manifest, "".join(
        json.dumps(done[index], ensure_ascii=False, separators=(",", ":")) + "\n"
        for index in sorted(done)))
    shutil.rmtree(out / SCRATCH_DIR, ignore_errors=True)
    failures = out / "failures.jsonl"
    if failed:
        with open(failures, "w", encoding="utf-8") as f:
            for index, why in sorted(failed):
                f.write(json.dumps({"index": index, "error": why}) + "\n")
    elif failures.exists():
        failures.unlink()


def build_synth(
    out_dir: str | Path,
    split: str,
    n_songs: int,
    seed: int = 0,
    jobs: int | None = None,
    min_s: float = 40.0,
    max_s: float = 120.0,
    soundfonts: Sequence[str | Path] | None = None,
    progress: bool = True,
    *,
    force_structure: bool = False,
    render_rate_hz: int = DEFAULT_RENDER_RATE_HZ,
) -> Path:
    """Build the synthetic benchmark split into ``out_dir``; returns the manifest path.

    Resumable: songs already in the manifest (with their audio) are kept; run again with a
    larger ``n_songs`` to extend a build. ``jobs`` processes (default: CPU count).
    ``soundfonts`` defaults to FluidR3_GM and TimGM6mb (the only ones train/valid accept).
    ``render_rate_hz`` is FluidSynth's rate (resampled to 16 kHz); ``force_structure`` is
    for tests. Songs failing every retry are logged, listed in
    ``failures.jsonl`` and left out; they never stop the build.
    """
    return run_build(out_dir, split, n_songs, seed, jobs, min_s, max_s, soundfonts, progress,
                     force_structure=force_structure, render_rate_hz=render_rate_hz).manifest
