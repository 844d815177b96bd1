"""The ground-truth label rules of ``rtagger/data/synth_tags_v1.csv``, in one module.

The tags of a synthetic song are computed from the MIDI file that FluidSynth renders (after
every edit), following the CSV rule by rule; its timeline says where each tag holds, and
:func:`window_labels` reads the tags of a window from it. Everything here is a pure function
of :mod:`mido` objects (read through :mod:`rtagger.train.synth.midi`), so the rules can be
tested on MIDI files built by hand; nothing here imports the generator.

Facts that MIDI cannot carry by itself (the key of the chord progression and where the
music was transposed) travel inside the file as marker meta events written by the
generator (``rtagger:key:<tonic pc>:<mode>`` at tick 0 and ``rtagger:key_change:<+-n>``),
so the MIDI file alone is enough to recompute every tag.

Interpretations of the rules that the CSV leaves open (kept here, in one place):

- a note sounds from its note-on to the next note-off of its channel and pitch (a note-on
  with velocity 0 is a note-off) or to the next note-on of the same channel and pitch, as
  FluidSynth releases a re-struck key; a note never released sounds to the end of the
  track (:func:`rtagger.train.synth.midi.collect_notes`); the track's duration is the
  time of its last MIDI event;
- the instrument of a note is the General MIDI program of its channel at its onset;
- drums "sound" from one drum onset to the next one when that comes within
  :data:`DRUM_CONTINUITY_S`, otherwise for :data:`DRUM_TAIL_S` after the onset;
- a tempo change "by at least 15 %" compares the new tempo with the one before it;
- key_change: 1 to 6 semitones up or down.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import mido

from rtagger.errors import RtaggerError
from rtagger.model.vocab import load_vocabulary
from rtagger.train.synth.midi import (
    DRUM_CHANNEL,
    PITCH_NAMES,
    Interval,
    Note,
    TempoMap,
    collect_notes,
    end_tick,
    overlap_length,
    read_markers,
    total_length,
    union_intervals,
)

# --- The rules of synth_tags_v1.csv, as constants ------------------------------------------
INSTRUMENT_MIN_S = 2.0  # an instrument tag needs this much sounding time (note union)
DRUMS_MIN_NOTES = 8
SLOW_BELOW_BPM = 90.0
FAST_FROM_BPM = 140.0
STRUCTURE_START_FRAC = 0.3  # key/tempo changes happen between 30 % ...
STRUCTURE_END_FRAC = 0.7  # ... and 70 % of the duration
NEW_SECTION_MIN_S = 15.0  # the new key / new tempo lasts at least this long
TEMPO_CHANGE_MIN_FRAC = 0.15
KEY_CHANGE_MAX_SEMITONES = 6
BREAKDOWN_MIN_S = 8.0
BREAKDOWN_START_FRAC = 0.2
BREAKDOWN_END_FRAC = 0.9
BREAKDOWN_DRUMS_AROUND_S = 10.0  # drums sound at least this long before and after

# Our reading of "drums sound": an onset keeps the drums sounding until the next onset when
# that is at most 4 s away (one bar of slow 4/4 with a kick on beat 1 only), else 0.5 s.
DRUM_CONTINUITY_S = 4.0
DRUM_TAIL_S = 0.5

# General MIDI program families -> instrument tag (0-based program numbers).
INSTRUMENT_PROGRAMS: dict[str, tuple[range, ...]] = {
    "piano": (range(0, 8),),
    "mallets": (range(8, 16),),
    "organ": (range(16, 21),),
    "accordion": (range(21, 24),),
    "guitar": (range(24, 32),),
    "bass": (range(32, 40),),
    "strings": (range(40, 46), range(48, 52)),
    "choir": (range(52, 55),),
    "brass": (range(56, 64),),
    "saxophone": (range(64, 68),),
    "woodwind": (range(68, 80),),
    "synth": (range(80, 96),),
}
_PROGRAM_TAG = {p: tag for tag, ranges in INSTRUMENT_PROGRAMS.items() for r in ranges for p in r}


class MidiRuleError(RtaggerError):
    """A MIDI file cannot be tagged (no events, unreadable marker...)."""


# --- Vocabulary ---------------------------------------------------------------------------
@dataclass(frozen=True)
class TagInfo:
    name: str
    group: str
    rule: str


@lru_cache(maxsize=1)
def tag_vocabulary() -> tuple[TagInfo, ...]:
    """The fixed 36-tag vocabulary, in file order (``rtagger/data/synth_tags_v1.csv``)."""
    return tuple(TagInfo(*row) for row in load_vocabulary())


def tags_in_group(group: str) -> tuple[str, ...]:
    return tuple(t.name for t in tag_vocabulary() if t.group == group)


def order_tags(tags: Iterable[str]) -> list[str]:
    """Vocabulary order; raises on a tag outside the vocabulary."""
    wanted = set(tags)
    order = [t.name for t in tag_vocabulary()]
    unknown = wanted - set(order)
    if unknown:
        raise MidiRuleError(f"tags outside synth_tags_v1.csv: {sorted(unknown)}")
    return [t for t in order if t in wanted]


def program_tag(program: int) -> str | None:
    """The instrument tag of a General MIDI program (0-127), None for 46, 47, 55 and 96+."""
    return _PROGRAM_TAG.get(program)


# --- Where instruments and drums sound ----------------------------------------------------
def instrument_intervals(notes: Iterable[Note]) -> dict[str, list[Interval]]:
    """Union of sounding intervals (s) per instrument tag, drums excluded."""
    per_tag: dict[str, list[Interval]] = defaultdict(list)
    for note in notes:
        if note.channel == DRUM_CHANNEL:
            continue
        tag = program_tag(note.program)
        if tag is not None:
            per_tag[tag].append((note.start_s, note.end_s))
    return {tag: union_intervals(iv) for tag, iv in per_tag.items()}


def drum_onsets(notes: Iterable[Note]) -> list[float]:
    return sorted(n.start_s for n in notes if n.channel == DRUM_CHANNEL)


def drum_sections(onsets: Sequence[float], duration: float) -> list[Interval]:
    """Where the drums sound (see the module docstring for the reading of "sound")."""
    spans = []
    for i, t in enumerate(onsets):
        nxt = onsets[i + 1] if i + 1 < len(onsets) else None
        if nxt is not None and nxt - t <= DRUM_CONTINUITY_S:
            spans.append((t, nxt))
        else:
            spans.append((t, min(duration, t + DRUM_TAIL_S)))
    return union_intervals(spans)


# --- Keys, from the generator's markers ---------------------------------------------------
def key_segments(midi: mido.MidiFile) -> list[tuple[float, float, int, str]]:
    """``(start_s, end_s, tonic_pc, mode)`` from the generator's key markers."""
    tmap = TempoMap(midi)
    dur = tmap.seconds(end_tick(midi))
    tonic: int | None = None
    mode = ""
    points: list[tuple[float, int, str]] = []
    try:
        for tick, kind, fields in read_markers(midi):
            if kind == "key":
                tonic, mode = int(fields[0]) % 12, fields[1]
                points.append((tmap.seconds(tick), tonic, mode))
            elif kind == "key_change" and tonic is not None:
                tonic = (tonic + int(fields[0])) % 12
                points.append((tmap.seconds(tick), tonic, mode))
    except (IndexError, ValueError) as err:
        raise MidiRuleError(f"malformed rtagger key marker: {err}") from err
    return [
        (t, points[i + 1][0] if i + 1 < len(points) else dur, pc, md)
        for i, (t, pc, md) in enumerate(points)
    ]


# --- The rules ----------------------------------------------------------------------------
def dominant_bpm(segments: Sequence[tuple[float, float, float]]) -> float | None:
    """The tempo that covers most of the time (ties: the one heard first)."""
    cover: dict[float, float] = {}
    for start, end, bpm in segments:
        cover[bpm] = cover.get(bpm, 0.0) + (end - start)
    if not cover:
        return None
    return max(cover, key=lambda b: cover[b])


def tempo_tags(bpm: float | None) -> set[str]:
    if bpm is None:
        return set()
    if bpm < SLOW_BELOW_BPM:
        return {"slow"}
    if bpm >= FAST_FROM_BPM:
        return {"fast"}
    return set()


def find_tempo_change(
    segments: Sequence[tuple[float, float, float]], duration: float
) -> dict[str, float] | None:
    """First tempo change satisfying the tempo_change rule, or None."""
    for prev, cur in itertools.pairwise(segments):
        t = cur[0]
        if not STRUCTURE_START_FRAC * duration <= t <= STRUCTURE_END_FRAC * duration:
            continue
        if abs(cur[2] - prev[2]) < TEMPO_CHANGE_MIN_FRAC * prev[2]:
            continue
        if cur[1] - t >= NEW_SECTION_MIN_S:
            return {"time": t, "from_bpm": prev[2], "to_bpm": cur[2]}
    return None


def find_key_change(
    keys: Sequence[tuple[float, float, int, str]], changes: Sequence[tuple[float, int]],
    duration: float,
) -> dict[str, float] | None:
    """First key change ``(time_s, semitones)`` satisfying the key_change rule, or None.

    ``changes`` come from the ``rtagger:key_change`` markers; ``keys`` (from
    :func:`key_segments`) gives how long each key lasts (the new key must last 15 s).
    """
    for t, semis in changes:
        if not 1 <= abs(semis) <= KEY_CHANGE_MAX_SEMITONES:
            continue
        if not STRUCTURE_START_FRAC * duration <= t <= STRUCTURE_END_FRAC * duration:
            continue
        seg_end = next((end for start, end, _, _ in keys if abs(start - t) < 1e-9), duration)
        if seg_end - t >= NEW_SECTION_MIN_S:
            return {"time": t, "semitones": semis}
    return None


def find_breakdown(onsets: Sequence[float], duration: float) -> dict[str, float] | None:
    """First section satisfying the breakdown rule, as ``{"start", "end"}`` (s), or None.

    The section is the gap between two drum onsets, clipped to 20 %-90 % of the duration.
    """
    if len(onsets) < 2:
        return None
    sections = drum_sections(onsets, duration)
    lo, hi = BREAKDOWN_START_FRAC * duration, BREAKDOWN_END_FRAC * duration
    for a, b in itertools.pairwise(onsets):
        start, end = max(a, lo), min(b, hi)
        # "starting after 20 %": the clipped start may sit exactly on 20 %, which we accept
        if end - start < BREAKDOWN_MIN_S:
            continue
        before = overlap_length(sections, 0.0, start)
        after = overlap_length(sections, end, duration)
        if before >= BREAKDOWN_DRUMS_AROUND_S and after >= BREAKDOWN_DRUMS_AROUND_S:
            return {"start": start, "end": end}
    return None


@dataclass
class MidiAnalysis:
    """Everything the rules need, computed once from a MIDI file."""

    duration: float
    notes: list[Note]
    instruments: dict[str, list[Interval]]
    drum_onsets: list[float]
    tempo_segments: list[tuple[float, float, float]]
    keys: list[tuple[float, float, int, str]]
    key_changes: list[tuple[float, int]]


def analyse(midi: mido.MidiFile) -> MidiAnalysis:
    tmap = TempoMap(midi)
    last = end_tick(midi)
    notes = collect_notes(midi)
    key_changes = [
        (tmap.seconds(tick), int(fields[0]))
        for tick, kind, fields in read_markers(midi)
        if kind == "key_change"
    ]
    return MidiAnalysis(
        duration=tmap.seconds(last),
        notes=notes,
        instruments=instrument_intervals(notes),
        drum_onsets=drum_onsets(notes),
        tempo_segments=tmap.segments(last),
        keys=key_segments(midi),
        key_changes=key_changes,
    )


def midi_tags(midi: mido.MidiFile, genres: Iterable[str]) -> list[str]:
    """Song-level tags of a rendered MIDI file, in vocabulary order (the CSV's rules)."""
    return tags_from_analysis(analyse(midi), genres)


def tags_from_analysis(info: MidiAnalysis, genres: Iterable[str]) -> list[str]:
    tags = {g for g in genres if g in tags_in_group("genre")}
    tags |= {
        tag for tag, iv in info.instruments.items() if total_length(iv) >= INSTRUMENT_MIN_S
    }
    if len(info.drum_onsets) >= DRUMS_MIN_NOTES:
        tags.add("drums")
    tags |= tempo_tags(dominant_bpm(info.tempo_segments))
    if info.keys:
        tags.add(info.keys[0][3])  # mode of the tonic chord, unchanged by transposition
    if find_key_change(info.keys, info.key_changes, info.duration):
        tags.add("key_change")
    if find_tempo_change(info.tempo_segments, info.duration):
        tags.add("tempo_change")
    if find_breakdown(info.drum_onsets, info.duration):
        tags.add("breakdown")
    return order_tags(tags)


def _r(x: float) -> float:
    return round(x, 3)


def midi_timeline(midi: mido.MidiFile) -> dict[str, Any]:
    """JSON-able timeline: per-tag sounding intervals, keys, tempi and structure events."""
    return timeline_from_analysis(analyse(midi))


def timeline_from_analysis(info: MidiAnalysis) -> dict[str, Any]:
    instruments = {
        tag: [[_r(a), _r(b)] for a, b in iv] for tag, iv in sorted(info.instruments.items())
    }
    instruments["drums"] = [
        [_r(a), _r(b)] for a, b in drum_sections(info.drum_onsets, info.duration)
    ]
    events: dict[str, Any] = {}
    if kc := find_key_change(info.keys, info.key_changes, info.duration):
        events["key_change"] = {"time": _r(kc["time"]), "semitones": kc["semitones"]}
    if tc := find_tempo_change(info.tempo_segments, info.duration):
        events["tempo_change"] = {k: _r(v) for k, v in tc.items()}
    if bd := find_breakdown(info.drum_onsets, info.duration):
        events["breakdown"] = {k: _r(v) for k, v in bd.items()}
    return {
        "duration": _r(info.duration),
        "instruments": instruments,
        "drum_notes": len(info.drum_onsets),
        "keys": [[_r(a), _r(b), PITCH_NAMES[pc], md] for a, b, pc, md in info.keys],
        "tempos": [[_r(a), _r(b), bpm] for a, b, bpm in info.tempo_segments],
        "events": events,
    }


def _most_covering(segments: Iterable[Sequence[Any]], start: float, end: float, idx: int) -> Any:
    cover: dict[Any, float] = {}
    for seg in segments:
        cover[seg[idx]] = cover.get(seg[idx], 0.0) + max(
            0.0, min(seg[1], end) - max(seg[0], start)
        )
    cover = {k: v for k, v in cover.items() if v > 0}
    return max(cover, key=lambda k: cover[k]) if cover else None


def window_bpm(timeline: Mapping[str, Any], start_s: float, end_s: float) -> float | None:
    """The tempo covering most of ``[start_s, end_s]`` in a song's timeline."""
    return _most_covering(timeline["tempos"], start_s, end_s, 2)


def window_labels(record: Mapping[str, Any], start_s: float, end_s: float) -> set[str]:
    """Tags of the window ``[start_s, end_s]`` of a manifest record, from its timeline.

    - genres: the song's genres (a groove has one style throughout);
    - instruments and drums: the tag sounds inside the window for at least
      ``min(2.0 s, half the window)``;
    - slow/fast and major/minor: from the tempo and the key covering most of the window;
    - key_change / tempo_change: the song-level event's time lies inside the window;
    - breakdown: at least half the window lies inside the song-level breakdown section.
    """
    if end_s <= start_s:
        raise MidiRuleError(f"empty window [{start_s}, {end_s}]")
    timeline = record["timeline"]
    length = end_s - start_s
    min_sound = min(INSTRUMENT_MIN_S, 0.5 * length)
    genres = set(tags_in_group("genre"))
    tags = {t for t in record["tags"] if t in genres}
    for tag, intervals in timeline["instruments"].items():
        if overlap_length([tuple(i) for i in intervals], start_s, end_s) >= min_sound:
            tags.add(tag)
    tags |= tempo_tags(_most_covering(timeline["tempos"], start_s, end_s, 2))
    mode = _most_covering(timeline["keys"], start_s, end_s, 3)
    if mode:
        tags.add(mode)
    events = timeline.get("events", {})
    for name in ("key_change", "tempo_change"):
        if name in events and start_s <= events[name]["time"] <= end_s:
            tags.add(name)
    if "breakdown" in events:
        bd = events["breakdown"]
        if overlap_length([(bd["start"], bd["end"])], start_s, end_s) >= 0.5 * length:
            tags.add("breakdown")
    return tags


# How much of a new section a listener must have heard before a prefix of the song counts as
# containing the change: two windows of new key, new tempo, or drums back after a breakdown.
PREFIX_HEARD_S = 7.5


def prefix_labels(record: Mapping[str, Any], end_s: float) -> tuple[set[str], set[str]]:
    """Song tags of the audio heard so far, ``[0, end_s]``, and the tags still undecided.

    What a live track context has heard when it has received ``end_s`` seconds: training the
    aggregator on growing contexts with the whole song's tags would teach it that a breakdown
    or a key change can be heard before it happens. Returns ``(tags, undecided)``; a tag in
    neither set is absent from the prefix. A prefix holds only the song's own tags; at or
    past the song's end it holds exactly them.

    - genres: the song's; instruments and drums: the song's that sound >= 2 s in the prefix;
    - slow/fast and major/minor: the tempo and key covering most of the prefix;
    - key_change / tempo_change: the change lies >= :data:`PREFIX_HEARD_S` before ``end_s``;
      undecided between the change and then;
    - breakdown: the drums have been back for :data:`PREFIX_HEARD_S`; undecided once the
      drums have been silent for :data:`BREAKDOWN_MIN_S` and until then.
    """
    song = set(record["tags"])
    timeline = record["timeline"]
    if end_s >= timeline["duration"]:
        return song, set()
    if end_s <= 0:
        raise MidiRuleError(f"empty prefix [0, {end_s}]")
    genres = set(tags_in_group("genre"))
    tags = song & genres
    for tag, intervals in timeline["instruments"].items():
        if tag in song and overlap_length([tuple(i) for i in intervals], 0.0,
                                          end_s) >= INSTRUMENT_MIN_S:
            tags.add(tag)
    tags |= tempo_tags(_most_covering(timeline["tempos"], 0.0, end_s, 2)) & song
    mode = _most_covering(timeline["keys"], 0.0, end_s, 3)
    if mode in song:
        tags.add(mode)
    undecided: set[str] = set()
    events = timeline.get("events", {})
    for name in ("key_change", "tempo_change"):
        if name in song and name in events:
            t = events[name]["time"]
            if end_s >= t + PREFIX_HEARD_S:
                tags.add(name)
            elif end_s > t:
                undecided.add(name)
    if "breakdown" in song and "breakdown" in events:
        bd = events["breakdown"]
        if end_s >= bd["end"] + PREFIX_HEARD_S:
            tags.add("breakdown")
        elif end_s >= bd["start"] + BREAKDOWN_MIN_S:
            undecided.add("breakdown")
    return tags, undecided
