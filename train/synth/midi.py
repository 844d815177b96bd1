"""MIDI side of the synthetic benchmark: tag rules, timelines, window labels, structure edits.

The tags of a synthetic song are computed from the MIDI file that FluidSynth renders (after
every edit), following ``rtagger/data/synth_tags_v1.csv`` rule by rule. Everything here is a
pure function of :mod:`mido` objects, so the rules can be tested on MIDI files built by hand.

Facts that MIDI cannot carry by itself (the key of the chord progression and where the
music was transposed) travel inside the file as marker meta events written by the
generator (``rtagger:key:<tonic pc>:<mode>`` at tick 0 and ``rtagger:key_change:<+-n>``),
so the MIDI file alone is enough to recompute every tag.

Interpretations of the rules that the CSV leaves open (kept here, in one place):

- a note sounds from its note-on to the next note-off of its channel and pitch (a note-on
  with velocity 0 is a note-off) or to the next note-on of the same channel and pitch, as
  FluidSynth releases a re-struck key; a note never released sounds to the end of the
  track; the track's duration is the time of its last MIDI event;
- the instrument of a note is the General MIDI program of its channel at its onset;
- drums "sound" from one drum onset to the next one when that comes within
  :data:`DRUM_CONTINUITY_S`, otherwise for :data:`DRUM_TAIL_S` after the onset;
- a tempo change "by at least 15 %" compares the new tempo with the one before it;
- key_change: 1 to 6 semitones up or down.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import mido

from rtagger.errors import RtaggerError
from rtagger.model.vocab import load_vocabulary

# --- The rules of synth_tags_v1.csv, as constants ------------------------------------------
DRUM_CHANNEL = 9  # General MIDI percussion channel 10 (mido counts channels from 0)
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
DEFAULT_TEMPO_US = 500_000  # MIDI default: 120 quarter notes per minute
BPM_DECIMALS = 2  # MIDI stores whole microseconds per quarter: 90 bpm reads 89.99995

MARKER_PREFIX = "rtagger:"
PITCH_NAMES = ("C", "Db", "D", "Eb", "E", "F", "Gb", "G", "Ab", "A", "Bb", "B")

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


# --- Interval arithmetic ------------------------------------------------------------------
Interval = tuple[float, float]


def union_intervals(intervals: Iterable[Interval]) -> list[Interval]:
    """Sorted, disjoint union (touching intervals merge); empty intervals are dropped."""
    out: list[list[float]] = []
    for start, end in sorted(i for i in intervals if i[1] > i[0]):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


def total_length(intervals: Iterable[Interval]) -> float:
    return sum(b - a for a, b in union_intervals(intervals))


def overlap_length(intervals: Iterable[Interval], start: float, end: float) -> float:
    """Length of the part of (the union of) ``intervals`` inside ``[start, end]``."""
    return sum(
        max(0.0, min(b, end) - max(a, start)) for a, b in union_intervals(intervals)
    )


# --- Timing -------------------------------------------------------------------------------
def abs_events(track: Iterable[mido.Message]) -> list[tuple[int, mido.Message]]:
    """A track's messages with absolute ticks."""
    tick = 0
    out = []
    for msg in track:
        tick += msg.time
        out.append((tick, msg))
    return out


def track_from_abs(
    events: Iterable[tuple[int, mido.Message]], name: str | None = None
) -> mido.MidiTrack:
    """Rebuild a track (delta times, one end_of_track) from absolute-tick messages."""
    ordered = sorted(
        ((t, m) for t, m in events if m.type != "end_of_track"), key=lambda e: e[0]
    )
    end_tick = max((t for t, m in events if m.type == "end_of_track"), default=0)
    track = mido.MidiTrack()
    if name is not None:
        track.append(mido.MetaMessage("track_name", name=name, time=0))
    last = 0
    for tick, msg in ordered:
        track.append(msg.copy(time=tick - last))
        last = tick
    track.append(mido.MetaMessage("end_of_track", time=max(0, end_tick - last)))
    return track


class TempoMap:
    """Tick <-> second conversion for a whole (type 0 or 1) MIDI file."""

    def __init__(self, midi: mido.MidiFile) -> None:
        self.tpq = midi.ticks_per_beat
        changes: dict[int, int] = {0: DEFAULT_TEMPO_US}
        for track in midi.tracks:
            for tick, msg in abs_events(track):
                if msg.type == "set_tempo":
                    changes[tick] = msg.tempo
        self.ticks = sorted(changes)
        self.tempos = [changes[t] for t in self.ticks]
        self.starts_s = [0.0]
        for i in range(1, len(self.ticks)):
            span = self.ticks[i] - self.ticks[i - 1]
            self.starts_s.append(self.starts_s[-1] + span * self.tempos[i - 1] / 1e6 / self.tpq)

    def seconds(self, tick: float) -> float:
        i = bisect.bisect_right(self.ticks, tick) - 1
        return self.starts_s[i] + (tick - self.ticks[i]) * self.tempos[i] / 1e6 / self.tpq

    def tick_at(self, seconds: float) -> int:
        i = bisect.bisect_right(self.starts_s, seconds) - 1
        return round(self.ticks[i] + (seconds - self.starts_s[i]) * 1e6 * self.tpq / self.tempos[i])

    def segments(self, end_tick: int) -> list[tuple[float, float, float]]:
        """``(start_s, end_s, bpm)`` up to ``end_tick``; equal neighbours are merged."""
        end_s = self.seconds(end_tick)
        out: list[list[float]] = []
        for i, tick in enumerate(self.ticks):
            if tick >= end_tick and i > 0:
                break
            bpm = round(60e6 / self.tempos[i], BPM_DECIMALS)
            start = self.starts_s[i]
            stop = self.starts_s[i + 1] if i + 1 < len(self.ticks) else end_s
            stop = min(stop, end_s)
            if out and out[-1][2] == bpm:
                out[-1][1] = stop
            else:
                out.append([start, stop, bpm])
        return [(a, b, c) for a, b, c in out]


def end_tick(midi: mido.MidiFile) -> int:
    """Tick of the file's last event (end_of_track included)."""
    return max((sum(m.time for m in track) for track in midi.tracks), default=0)


def duration_s(midi: mido.MidiFile) -> float:
    return TempoMap(midi).seconds(end_tick(midi))


# --- Notes --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Note:
    channel: int
    pitch: int
    velocity: int
    program: int
    start_tick: int
    end_tick: int
    start_s: float
    end_s: float


def _is_note_off(msg: mido.Message) -> bool:
    return msg.type == "note_off" or (msg.type == "note_on" and msg.velocity == 0)


def collect_notes(midi: mido.MidiFile) -> list[Note]:
    """Every note of the file with its channel's program at onset, sorted by onset."""
    tmap = TempoMap(midi)
    last_tick = end_tick(midi)
    # File order within a track, track order at equal ticks: the order a player uses.
    merged = [(t, m) for track in midi.tracks for t, m in abs_events(track) if not m.is_meta]
    merged.sort(key=lambda e: e[0])
    program = [0] * 16
    open_notes: dict[tuple[int, int], tuple[int, int, int]] = {}
    notes: list[Note] = []

    def close(channel: int, pitch: int, start: int, vel: int, prog: int, stop: int) -> None:
        notes.append(
            Note(channel, pitch, vel, prog, start, stop, tmap.seconds(start), tmap.seconds(stop))
        )

    for tick, msg in merged:
        if msg.type == "program_change":
            program[msg.channel] = msg.program
        elif msg.type in ("note_on", "note_off"):
            sounding = open_notes.pop((msg.channel, msg.note), None)
            if sounding is not None:  # released, or re-struck (which releases it too)
                close(msg.channel, msg.note, *sounding, tick)
            if not _is_note_off(msg):
                open_notes[(msg.channel, msg.note)] = (tick, msg.velocity, program[msg.channel])
    for (channel, pitch), (start, vel, prog) in open_notes.items():
        close(channel, pitch, start, vel, prog, max(last_tick, start))
    notes.sort(key=lambda n: (n.start_tick, n.channel, n.pitch))
    return notes


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


# --- Markers written by the generator -----------------------------------------------------
def key_marker(tonic_pc: int, mode: str) -> str:
    return f"{MARKER_PREFIX}key:{tonic_pc}:{mode}"


def key_change_marker(semitones: int) -> str:
    return f"{MARKER_PREFIX}key_change:{semitones:+d}"


def read_markers(midi: mido.MidiFile) -> list[tuple[int, str, list[str]]]:
    """``(tick, kind, fields)`` of every ``rtagger:`` marker, by tick."""
    out = []
    for track in midi.tracks:
        for tick, msg in abs_events(track):
            if msg.type == "marker" and msg.text.startswith(MARKER_PREFIX):
                kind, *fields = msg.text[len(MARKER_PREFIX) :].split(":")
                out.append((tick, kind, fields))
    out.sort(key=lambda m: m[0])
    return out


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


# --- Edits applied to MMA's output --------------------------------------------------------
def add_marker(midi: mido.MidiFile, tick: int, text: str) -> None:
    events = abs_events(midi.tracks[0])
    events.append((tick, mido.MetaMessage("marker", text=text)))
    midi.tracks[0] = track_from_abs(events)


def set_tempo_from(midi: mido.MidiFile, tick: int, bpm: float) -> None:
    """Make ``bpm`` the tempo from ``tick`` on (later tempo events are dropped)."""
    for i, track in enumerate(midi.tracks):
        kept = [(t, m) for t, m in abs_events(track) if not (m.type == "set_tempo" and t >= tick)]
        midi.tracks[i] = track_from_abs(kept)
    events = abs_events(midi.tracks[0])
    events.append((tick, mido.MetaMessage("set_tempo", tempo=round(60e6 / bpm))))
    midi.tracks[0] = track_from_abs(events)


def _fold_pitch(pitch: int) -> int:
    # Keep a transposed note playable: move it by octaves back into the MIDI range.
    while pitch > 127:
        pitch -= 12
    while pitch < 0:
        pitch += 12
    return pitch


def transpose_from(midi: mido.MidiFile, tick: int, semitones: int) -> None:
    """Transpose every non-drum note starting at or after ``tick`` by ``semitones``.

    Notes already sounding at ``tick`` keep their pitch until they are released: a note-off
    goes to the pitch its note actually got, and a re-struck key that now maps to another
    pitch first releases the old one (the sounding intervals do not change).
    """
    for i, track in enumerate(midi.tracks):
        sounding: dict[tuple[int, int], int] = {}  # (channel, written pitch) -> played pitch
        out: list[tuple[int, mido.Message]] = []
        for t, msg in abs_events(track):  # file order: the order the synthesizer reads
            if msg.is_meta or msg.type not in ("note_on", "note_off"):
                out.append((t, msg))
                continue
            if msg.channel == DRUM_CHANNEL:
                out.append((t, msg))
                continue
            key = (msg.channel, msg.note)
            played = sounding.pop(key, None)
            if _is_note_off(msg):
                out.append((t, msg.copy(note=msg.note if played is None else played)))
                continue
            pitch = _fold_pitch(msg.note + semitones) if t >= tick else msg.note
            if played is not None and played != pitch:
                out.append((t, mido.Message("note_off", channel=msg.channel, note=played)))
            sounding[key] = pitch
            out.append((t, msg.copy(note=pitch)))
        midi.tracks[i] = track_from_abs(out)


def remove_drums_between(midi: mido.MidiFile, start_tick: int, stop_tick: int) -> int:
    """Delete drum notes whose onset lies in ``[start_tick, stop_tick)``; returns how many."""
    removed = 0
    for i, track in enumerate(midi.tracks):
        events = abs_events(track)
        last_dropped: dict[int, bool] = {}  # drum key -> was its latest onset dropped
        out = []
        for t, msg in events:  # file order: the order the synthesizer reads
            if msg.is_meta or msg.type not in ("note_on", "note_off"):
                out.append((t, msg))
            elif msg.channel != DRUM_CHANNEL:
                out.append((t, msg))
            elif _is_note_off(msg):
                if not last_dropped.pop(msg.note, False):
                    out.append((t, msg))
            else:
                drop = start_tick <= t < stop_tick
                last_dropped[msg.note] = drop
                removed += drop
                if not drop:
                    out.append((t, msg))
        midi.tracks[i] = track_from_abs(out)
    return removed


def set_channel_program(midi: mido.MidiFile, channel: int, program: int) -> None:
    """Replace every program change of ``channel`` (re-voicing one accompaniment part)."""
    for track in midi.tracks:
        for k, msg in enumerate(track):
            if msg.type == "program_change" and msg.channel == channel:
                track[k] = msg.copy(program=program)


def bar_ticks(midi: mido.MidiFile, prefix: str = f"{MARKER_PREFIX}bar") -> list[int]:
    """Bar-line ticks from the ``MidiMark`` markers the generator puts before every bar."""
    return sorted(
        t
        for track in midi.tracks
        for t, m in abs_events(track)
        if m.type == "marker" and m.text.startswith(prefix)
    )


# --- Placing structure events (each placement is judged by the rule functions above) ------
PLACEMENT_MARGIN_FRAC = 0.01  # keeps a change valid after MIDI rounds tempi to whole us


def _inside_margin(t: float, duration: float) -> bool:
    lo = (STRUCTURE_START_FRAC + PLACEMENT_MARGIN_FRAC) * duration
    return lo <= t <= (STRUCTURE_END_FRAC - PLACEMENT_MARGIN_FRAC) * duration

def place_tempo_change(
    midi: mido.MidiFile, bars: Sequence[int], rng: random.Random,
    duration_range_s: tuple[float, float] | None = None,
) -> dict[str, float] | None:
    """Insert a tempo change at a bar line so that the tempo_change rule holds."""
    tmap = TempoMap(midi)
    last = end_tick(midi)
    old_bpm = dominant_bpm(tmap.segments(last)) or 120.0
    factor = rng.uniform(1.18, 1.4) if rng.random() < 0.5 else rng.uniform(0.62, 0.82)
    new_bpm = round(min(240.0, max(40.0, old_bpm * factor)))
    if abs(new_bpm - old_bpm) < (TEMPO_CHANGE_MIN_FRAC + 0.02) * old_bpm:
        new_bpm = round(old_bpm * (0.8 if new_bpm > old_bpm else 1.2))  # clamped: flip way
    candidates = list(bars[1:])
    rng.shuffle(candidates)
    fallback = None
    for tick in candidates:
        t = tmap.seconds(tick)
        new_dur = t + (last - tick) * 60.0 / new_bpm / tmap.tpq
        segs = [s for s in tmap.segments(tick)] + [(t, new_dur, float(new_bpm))]
        if not find_tempo_change(segs, new_dur):
            continue
        if not _inside_margin(t, new_dur):
            continue
        if duration_range_s is None or duration_range_s[0] <= new_dur <= duration_range_s[1]:
            fallback = tick
            break
        fallback = fallback if fallback is not None else tick
    if fallback is None:
        return None
    set_tempo_from(midi, fallback, new_bpm)
    return {"tick": fallback, "bpm": float(new_bpm)}


def place_key_change(
    midi: mido.MidiFile, bars: Sequence[int], rng: random.Random
) -> dict[str, int] | None:
    """Transpose from a bar line so that the key_change rule holds; adds the marker."""
    tmap = TempoMap(midi)
    dur = tmap.seconds(end_tick(midi))
    semis = rng.randint(1, KEY_CHANGE_MAX_SEMITONES) * rng.choice((-1, 1))
    candidates = [
        tick for tick in bars[1:]
        if _inside_margin(tmap.seconds(tick), dur)
        and dur - tmap.seconds(tick) >= NEW_SECTION_MIN_S + 0.5
    ]
    if not candidates:
        return None
    tick = rng.choice(candidates)
    transpose_from(midi, tick, semis)
    add_marker(midi, tick, key_change_marker(semis))
    return {"tick": tick, "semitones": semis}


def place_breakdown(
    midi: mido.MidiFile, bars: Sequence[int], rng: random.Random
) -> dict[str, int] | None:
    """Remove the drums over whole bars so that the breakdown rule holds (if it can)."""
    tmap = TempoMap(midi)
    dur = tmap.seconds(end_tick(midi))
    onsets = [(n.start_tick, n.start_s) for n in collect_notes(midi) if n.channel == DRUM_CHANNEL]
    if len(onsets) < DRUMS_MIN_NOTES:
        return None
    all_bars = [*bars, end_tick(midi)]
    target_s = rng.uniform(BREAKDOWN_MIN_S + 0.5, BREAKDOWN_MIN_S + 4.0)
    pairs = []
    for i, a in enumerate(all_bars):
        for b in all_bars[i + 1 :]:
            if tmap.seconds(b) - tmap.seconds(a) >= target_s:
                pairs.append((a, b))
                break
    rng.shuffle(pairs)
    for a, b in pairs:
        kept = [s for t, s in onsets if not a <= t < b]
        found = find_breakdown(kept, dur)
        # accept only when the rule finds this very section (not a gap elsewhere)
        if found and found["start"] <= tmap.seconds(a) and found["end"] >= tmap.seconds(b):
            remove_drums_between(midi, a, b)
            return {"start_tick": a, "end_tick": b}
    return None
