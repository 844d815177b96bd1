"""Song plans: everything the synthetic benchmark decides from a song's seed.

A plan fixes the groove, tempo, key, chord progression, length, lead and accompaniment
programs and the structure events to try, from nothing but (split, base seed, index,
attempt) and :data:`GENERATOR_VERSION`; :func:`mma_source` writes it as an MMA file. The
lead melody (:func:`melody_notes`) is written over the bar lines of MMA's MIDI, with a
random stream of its own.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rtagger.train.synth.grooves import (
    SynthError,
    beats_per_bar,
    check_soundfonts,
    groove_files,
    groove_names,
    is_drum_only,
    tempo_range_bpm,
)
from rtagger.train.synth.labels import program_tag
from rtagger.train.synth.midi import MARKER_PREFIX, PITCH_NAMES

GENERATOR_VERSION = "synth-v1"  # part of every song seed: bump it when the output changes

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
    fonts = check_soundfonts(split, soundfonts)
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
    return f"{PITCH_NAMES[chord[0]]}{chord[1]}"


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
        lines.append(f"MidiMark {MARKER_PREFIX}bar:{b}")
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
    family = program_tag(plan.lead_program)
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
