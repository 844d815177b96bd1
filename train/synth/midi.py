"""MIDI mechanics of the synthetic benchmark: timing, notes, markers and edits, with mido.

Ticks and seconds (:class:`TempoMap`), the notes a player sounds (:func:`collect_notes`),
interval arithmetic in seconds, the ``rtagger:`` marker meta events the generator writes
(keys and bar lines), and the edits applied to MMA's output: a lead track, a re-voiced
part, a tempo change, a transposition, drums removed. Everything is a function of
:mod:`mido` objects; the label rules (:mod:`rtagger.train.synth.labels`) read files through
it, and nothing here knows a tag.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import mido

DRUM_CHANNEL = 9  # General MIDI percussion channel 10 (mido counts channels from 0)
DEFAULT_TEMPO_US = 500_000  # MIDI default: 120 quarter notes per minute
BPM_DECIMALS = 2  # MIDI stores whole microseconds per quarter: 90 bpm reads 89.99995

MARKER_PREFIX = "rtagger:"
PITCH_NAMES = ("C", "Db", "D", "Eb", "E", "F", "Gb", "G", "Ab", "A", "Bb", "B")


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


def bar_ticks(midi: mido.MidiFile, prefix: str = f"{MARKER_PREFIX}bar") -> list[int]:
    """Bar-line ticks from the ``MidiMark`` markers the generator puts before every bar."""
    return sorted(
        t
        for track in midi.tracks
        for t, m in abs_events(track)
        if m.type == "marker" and m.text.startswith(prefix)
    )


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


def add_lead_track(
    midi: mido.MidiFile, notes: Sequence[tuple[int, int, int, int]], program: int
) -> int | None:
    """Add the melody on a channel MMA left free; returns the channel (None: no free one)."""
    used = {m.channel for t in midi.tracks for m in t if not m.is_meta and hasattr(m, "channel")}
    free = [c for c in range(16) if c != DRUM_CHANNEL and c not in used]
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
    midi.tracks.append(track_from_abs(events, name="Lead"))
    return ch
