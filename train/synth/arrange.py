"""A song's MIDI: MMA's output for a plan, with the generator's edits applied.

:func:`make_midi` runs ``mma`` on :func:`~rtagger.train.synth.plan.mma_source`, then edits
the file with :mod:`rtagger.train.synth.midi`: the lead melody, a re-voiced accompaniment
part, and the structure events (tempo change, key change, breakdown), each placed at bar
lines where the label rules of :mod:`rtagger.train.synth.labels` find it. Every edit draws
from a random stream of its own, so changing one does not reshuffle the others.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mido

from rtagger.train.synth.grooves import SynthError, run_tool
from rtagger.train.synth.labels import (
    BREAKDOWN_MIN_S,
    DRUMS_MIN_NOTES,
    KEY_CHANGE_MAX_SEMITONES,
    NEW_SECTION_MIN_S,
    STRUCTURE_END_FRAC,
    STRUCTURE_START_FRAC,
    TEMPO_CHANGE_MIN_FRAC,
    dominant_bpm,
    find_breakdown,
    find_tempo_change,
    program_tag,
)
from rtagger.train.synth.midi import (
    DRUM_CHANNEL,
    TempoMap,
    add_lead_track,
    add_marker,
    bar_ticks,
    collect_notes,
    end_tick,
    key_change_marker,
    key_marker,
    remove_drums_between,
    set_channel_program,
    set_tempo_from,
    transpose_from,
)
from rtagger.train.synth.plan import SongPlan, melody_notes, mma_source

MMA_TIMEOUT_S = 120


@dataclass
class MidiResult:
    """The MIDI to render and the edits made to it (recorded in the manifest)."""

    midi: mido.MidiFile
    edits: dict[str, Any] = field(default_factory=dict)


def make_midi(plan: SongPlan, workdir: Path) -> MidiResult:
    """Run MMA on the plan and apply the edits; the returned MIDI is what gets rendered."""
    mma_path, raw_path = workdir / "song.mma", workdir / "mma.mid"
    mma_path.write_text(mma_source(plan), encoding="utf-8")
    # relative names: MMA writes the input file name into the MIDI, keep it repeatable
    run_tool(["mma", "-f", raw_path.name, mma_path.name], MMA_TIMEOUT_S, f"{plan.id} MMA", workdir)
    try:
        midi = mido.MidiFile(raw_path)
    except (OSError, EOFError, ValueError, KeyError) as err:
        raise SynthError(f"{plan.id}: MMA wrote an unreadable MIDI file: {err}") from err
    bars = bar_ticks(midi)
    if len(bars) != plan.n_bars:
        raise SynthError(f"{plan.id}: expected {plan.n_bars} bar marks, MMA wrote {len(bars)}")
    edits: dict[str, Any] = {}
    last = end_tick(midi)
    # One random stream per edit, so that changing one edit does not reshuffle the others.
    rng = {k: random.Random(f"{plan.song_seed}:{k}") for k in ("lead", "voice", "tc", "kc", "bd")}
    if plan.lead_program is not None:
        notes = melody_notes(plan, bars, last, midi.ticks_per_beat, rng["lead"])
        ch = add_lead_track(midi, notes, plan.lead_program)
        edits["lead"] = None if ch is None else {"channel": ch, "program": plan.lead_program}
    if plan.revoice_program is not None:
        programs = {
            m.channel: m.program for t in midi.tracks for m in t
            if m.type == "program_change" and m.channel != DRUM_CHANNEL
        }
        if (edits.get("lead") or {}).get("channel") in programs:
            del programs[edits["lead"]["channel"]]
        # bass parts stay bass: a piano playing the bass line would sound like a mistake
        cands = sorted(c for c, p in programs.items() if program_tag(p) != "bass")
        if cands:
            ch = rng["voice"].choice(cands)
            set_channel_program(midi, ch, plan.revoice_program)
            edits["revoice"] = {"channel": ch, "from": programs[ch], "to": plan.revoice_program}
    if plan.tempo_change:
        edits["tempo_change"] = place_tempo_change(
            midi, bars, rng["tc"], (plan.min_s, plan.max_s)
        )
    if plan.key_change:
        edits["key_change"] = place_key_change(midi, bars, rng["kc"])
    if plan.breakdown:
        edits["breakdown"] = place_breakdown(midi, bars, rng["bd"])
    add_marker(midi, 0, key_marker(plan.tonic_pc, plan.mode))
    return MidiResult(midi, edits)


# --- Placing structure events (each placement is judged by the label rules) ---------------
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
