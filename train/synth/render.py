"""One synthetic song: its MIDI rendered by FluidSynth to checked 16 kHz FLAC, and its record.

:func:`synthesize_song` makes the MIDI (:func:`~rtagger.train.synth.arrange.make_midi`),
computes tags and timeline from the saved file (the bytes FluidSynth reads), renders it
with ``fluidsynth`` at ``render_rate_hz``, resamples it to 16 kHz mono with FFmpeg,
normalises its loudness and writes FLAC. Audio and MIDI are renamed into place atomically;
the manifest record is returned, for the build to write.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mido
import numpy as np

from rtagger.atomic import atomic_path
from rtagger.audio.decode import SAMPLE_RATE
from rtagger.audio.encode import write_flac
from rtagger.errors import AudioError
from rtagger.train.synth.arrange import make_midi
from rtagger.train.synth.grooves import SynthError, groove_files, run_tool
from rtagger.train.synth.labels import analyse, tags_from_analysis, timeline_from_analysis
from rtagger.train.synth.midi import PITCH_NAMES
from rtagger.train.synth.plan import GENERATOR_VERSION, SongPlan, chord_name

# FluidSynth's output rate. At 16 kHz it aliases what it would render above 8 kHz into the
# band; a higher rate (32000: FFmpeg's resampler then low-passes to 16 kHz) cuts the log-mel
# error against a 48 kHz render from ~2.6 to ~1.9 dB but costs 1.6x the CPU (docs/data.md).
DEFAULT_RENDER_RATE_HZ = SAMPLE_RATE
AUDIO_TAIL_S = 2.0  # release/reverb kept after the last MIDI event
FADE_OUT_S = 0.25  # only where the tail is cut, to avoid a click
TARGET_RMS_DBFS = -20.0
PEAK_LIMIT = 0.97
SILENT_RMS = 1e-4  # a render quieter than this (before normalisation) failed
FLUIDSYNTH_TIMEOUT_S = 900
SCRATCH_DIR = ".scratch"  # per-song work folders inside the output folder


# --- Audio --------------------------------------------------------------------------------
def render_audio(
    midi_path: Path, soundfont: str | Path, duration_s: float, workdir: Path,
    render_rate_hz: int = DEFAULT_RENDER_RATE_HZ,
) -> np.ndarray:
    """FluidSynth render -> float32 mono at :data:`SAMPLE_RATE`, RMS-normalised."""
    raw = workdir / "render.f32"
    run_tool(
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
        info = analyse(rendered)
        tags = tags_from_analysis(info, groove.genres)
        timeline = timeline_from_analysis(info)
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
        "key": f"{PITCH_NAMES[plan.tonic_pc]} {plan.mode}",
        "chords": " | ".join(" ".join(chord_name(c) for c in bar) for bar in plan.progression),
        "edits": _jsonable(result.edits),
        "midi": midi_rel,
        "generator": GENERATOR_VERSION,
        "timeline": timeline,
    }


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj))
