"""Real checks for held-out evaluation: Debian's MIDI music rendered, labelled from the MIDI.

``rtagger data realchecks --out data/realchecks`` fetches the packages of :data:`SOURCES`
(composed music shipped as Standard MIDI Files, in Debian packages that are neither in the
unlabelled pool nor held out) with :func:`rtagger.train.data.debian.fetch_packages`, plus
the soundfont of :data:`SOUNDFONT_PACKAGE`, then renders every MIDI file with FluidSynth to
checked 16 kHz mono FLAC (:func:`rtagger.train.synth.render.render_audio`) and writes one
manifest record per track whose labels come from the MIDI file itself: which General MIDI
instrument families play, and for how much of the track (:func:`midi_labels`).

The rule (version :data:`RULES_VERSION`): a tag's *share* is the part of the track (from
0 s to its last note-off) during which its programs are playing, where notes of the
family closer together than :data:`BRIDGE_S` count as one passage (drums: the synthetic
benchmark's :func:`~rtagger.train.synth.labels.drum_sections`). A tag is **positive**
when its share is at least :data:`POSITIVE_MIN_SHARE`, **negative** when neither its
programs nor the programs that sound close to them (``near``: viola or a string ensemble
for violin, harpsichord for piano, ...) play a single note, and **unlabelled** otherwise
(it plays, but too little to call it a tag of the track). Only the drum channel (MIDI
channel 10) counts as drums; a note's instrument is its channel's program at its onset.
A file with more tracks than FluidSynth plays is merged into one track (type 0) first,
and that file is what is rendered, labelled and kept.

Resumable: a track already in the manifest is skipped; one that fails is listed in
``failures.jsonl`` and the others go on. Tracks whose notes repeat a track already built
(the same piece shipped twice) are skipped as duplicates.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import re
import shutil
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rtagger.atomic import atomic_path, atomic_write
from rtagger.audio.decode import SAMPLE_RATE
from rtagger.audio.encode import write_flac
from rtagger.catalog.add import file_sha256
from rtagger.errors import AudioError, ConfigError, RtaggerError
from rtagger.model.vocab import tags_v2
from rtagger.train.data.debian import (
    POOL_PACKAGES,
    check_not_held_out,
    copyright_of,
    fetch_packages,
    fetched,
)
from rtagger.train.data.manifest import ManifestWriter, Track, read_manifest
from rtagger.train.progress import Bar

log = logging.getLogger(__name__)

RULES_VERSION = "realchecks-midi-1"
POSITIVE_MIN_SHARE = 0.20  # the family plays during at least a fifth of the track
BRIDGE_S = 1.0  # notes of one family closer than this belong to one passage
MIN_TRACK_S = 15.0  # shorter files are jingles or tests, not pieces
FLUIDSYNTH_MAX_TRACKS = 128  # FluidSynth plays nothing of a file with more (crimson's: 380)
SPLIT = "test"


@dataclass(frozen=True)
class MidiSource:
    """A Debian package with composed music as MIDI files (globs relative to its root)."""

    package: str
    globs: tuple[str, ...]
    # The licence the copyright file gives these files, where its source-tree patterns miss
    # the installed paths (or its paragraph is free text); "" reads it from the file.
    licence: str = ""


# Debian 12 (bookworm) main, free licences; found in its Contents indices (docs/realchecks.md).
# Left out: MIDI of pool packages (freedink-data), MMA's examples (the synthetic benchmark's
# grooves), exercises (pianobooster's beginner course), copies of a piece already here
# (sfront's Bach invention), and files whose composition is not free (faust, pd-mrpeach).
SOURCES: tuple[MidiSource, ...] = (
    MidiSource("simutrans-data", ("usr/share/games/simutrans/music/*.mid",)),  # 53
    MidiSource("openttd-openmsx", ("usr/share/games/openttd/baseset/openmsx/*.mid",)),  # 31
    MidiSource("pianobooster", ("usr/share/doc/pianobooster/courses/BoosterMusic/*.mid*",),
               "CC-BY"),  # "Files: music/*" of its copyright file
    MidiSource("playmidi", ("usr/share/doc/playmidi/examples/*.mid.gz",)),
    MidiSource("liquidwar-data", ("usr/share/games/liquidwar/music/*.mid",)),
    MidiSource("pinball-table-hurd-data", ("usr/share/games/pinball/hurd/*.mid",)),
    MidiSource("kobodeluxe-data", ("usr/share/kobo-deluxe/sfx/trance1.mid",)),
    MidiSource("pangzero", ("usr/share/perl5/auto/share/dist/Games-PangZero/*.mid",)),
    MidiSource("crimson", ("usr/share/games/crimson/music/*.mid",),
               "GPL-2+ or CC-BY-SA-1.0"),  # its "License for the soundtrack"
    MidiSource("chuck-data", ("usr/share/doc/chuck-data/examples/midi/*.mid",)),
    MidiSource("yoshimi-data", ("usr/share/yoshimi/examples/*.mid",)),
)

# A complete GM bank (128 programs and drum kits) that neither the synthetic training set
# (FluidR3_GM, TimGM6mb) nor the reserved MuseScore fonts are: csound's public-domain bank.
SOUNDFONT_PACKAGE = "csound-soundfont"
SOUNDFONT_FILE = "usr/share/sounds/sf2/sf_GMbank.sf2"


# --- The label rule -------------------------------------------------------------------------
@dataclass(frozen=True)
class FamilyRule:
    """One tag: the GM programs (0-based) that play it, and those that bar a negative."""

    tag: str
    programs: frozenset[int]
    near: frozenset[int] = frozenset()


def _p(*spans: range | int) -> frozenset[int]:
    return frozenset(p for s in spans for p in ([s] if isinstance(s, int) else s))


DRUMS = "drums"
STRINGS = (range(40, 46), range(48, 52))  # violin..pizzicato, string ensembles
RULES: tuple[FamilyRule, ...] = (
    FamilyRule("piano", _p(range(0, 6)), _p(6, 7)),  # acoustic and electric pianos
    FamilyRule("mallets", _p(range(8, 16))),
    FamilyRule("organ", _p(range(16, 21))),
    FamilyRule("accordion", _p(range(21, 24))),
    FamilyRule("guitar", _p(range(24, 32)), _p(range(104, 108))),
    FamilyRule("bass", _p(range(32, 40)), _p(43)),
    FamilyRule("strings", _p(*STRINGS), _p(110)),
    FamilyRule("choir", _p(52, 53), _p(54, 85, 91)),
    FamilyRule("brass", _p(range(56, 64))),
    FamilyRule("saxophone", _p(range(64, 68))),
    FamilyRule("woodwind", _p(range(68, 80))),
    FamilyRule("synth", _p(range(80, 96)), _p(range(96, 104), 38, 39, 50, 51, 54, 62, 63)),
    FamilyRule(DRUMS, frozenset(), _p(47, range(113, 120))),  # drum channel; timpani, toms
    FamilyRule("violin", _p(40, 110), _p(41, range(44, 46), range(48, 52))),
    FamilyRule("cello", _p(42), _p(41, 43, range(44, 46), range(48, 52))),
    FamilyRule("harp", _p(46)),
    FamilyRule("harpsichord", _p(6), _p(7)),
    FamilyRule("flute", _p(72, 73), _p(range(74, 80))),
    FamilyRule("sitar", _p(104), _p(range(105, 108))),
)
CHECK_TAGS = tuple(r.tag for r in RULES)
assert set(CHECK_TAGS) <= set(tags_v2()), "every check tag is a vocabulary v2 tag"


class RealcheckError(RtaggerError):
    """A check source cannot be read, labelled or rendered."""


def midi_bytes(data: bytes) -> bytes:
    """A MIDI file's bytes, decompressed when gzipped (``.mid.gz``)."""
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def read_midi(data: bytes, name: str):
    """A ``mido.MidiFile`` from a file's bytes (gzip-compressed or not).

    A key signature with an invalid mode byte (two of simutrans' files) makes mido refuse
    the whole file; such a mode is set to major for reading only, since key signatures
    neither sound nor count in the labels.
    """
    import mido
    from mido.midifiles.meta import KeySignatureError

    data = midi_bytes(data)
    try:
        try:
            return mido.MidiFile(file=io.BytesIO(data))
        except KeySignatureError:
            fixed = re.sub(rb"\xff\x59\x02.[^\x00\x01]", lambda m: m[0][:4] + b"\x00",
                           data, flags=re.DOTALL)
            return mido.MidiFile(file=io.BytesIO(fixed))
    except (OSError, EOFError, ValueError, KeyError, IndexError) as e:
        raise RealcheckError(f"{name}: not a readable MIDI file ({e})") from e


def merged(midi):
    """A type-0 copy of ``midi``: every track's events merged in time order."""
    import mido

    out = mido.MidiFile(type=0, ticks_per_beat=midi.ticks_per_beat)
    out.tracks.append(mido.merge_tracks(midi.tracks))
    return out


def _bridged(intervals: Iterable[tuple[float, float]], gap_s: float) -> list[tuple[float, float]]:
    from rtagger.train.synth.midi import union_intervals

    out: list[tuple[float, float]] = []
    for a, b in union_intervals(intervals):
        if out and a - out[-1][1] < gap_s:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def midi_labels(midi) -> tuple[dict[str, int], dict[str, float], float]:
    """``(labels, shares, length_s)`` of a MIDI file by the rule of the module docstring.

    ``labels``: tag -> 1 or 0 (unlabelled tags absent), ``shares``: tag -> share of the
    track's length (0..1), ``length_s``: 0 s to the last note-off.
    """
    from rtagger.train.synth.labels import drum_sections
    from rtagger.train.synth.midi import DRUM_CHANNEL, collect_notes, total_length

    notes = collect_notes(midi)
    if not notes:
        raise RealcheckError("the MIDI file plays no note")
    length = max(n.end_s for n in notes)
    if length <= 0:
        raise RealcheckError("the MIDI file's notes last 0 s")
    by_program: dict[int, list[tuple[float, float]]] = defaultdict(list)
    drum_onsets = []
    for n in notes:
        if n.channel == DRUM_CHANNEL:
            drum_onsets.append(n.start_s)
        else:
            by_program[n.program].append((n.start_s, n.end_s))
    labels, shares = {}, {}
    for rule in RULES:
        if rule.tag == DRUMS:
            playing = drum_sections(sorted(drum_onsets), length)
            plays = bool(drum_onsets)
        else:
            spans = [iv for p in rule.programs for iv in by_program.get(p, ())]
            playing, plays = _bridged(spans, BRIDGE_S), bool(spans)
        share = min(1.0, total_length(playing) / length)
        shares[rule.tag] = round(share, 4)
        if share >= POSITIVE_MIN_SHARE:
            labels[rule.tag] = 1
        elif not plays and not any(p in by_program for p in rule.near):
            labels[rule.tag] = 0
    return labels, shares, length


def notes_fingerprint(midi) -> str:
    """SHA-256 of the pitched notes' onsets (10 ms) and pitches: one piece saved twice
    (another track layout or channel order, the same music) gets the same fingerprint."""
    from rtagger.train.synth.midi import DRUM_CHANNEL, collect_notes

    key = sorted((round(n.start_s * 100), n.pitch) for n in collect_notes(midi)
                 if n.channel != DRUM_CHANNEL)
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()


# --- Building the check ---------------------------------------------------------------------
@dataclass
class RealcheckReport:
    manifest: Path
    soundfont: str
    n_new: int = 0
    n_kept: int = 0
    duplicates: list[str] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (id, reason)
    packages: dict[str, str] = field(default_factory=dict)  # fetch status
    tracks_by_package: dict[str, int] = field(default_factory=dict)
    seconds_by_package: dict[str, float] = field(default_factory=dict)
    labels: dict[str, list[int]] = field(default_factory=dict)  # tag -> [positives, negatives]
    elapsed_s: float = 0.0

    @property
    def n_tracks(self) -> int:
        return sum(self.tracks_by_package.values())

    @property
    def hours(self) -> float:
        return sum(self.seconds_by_package.values()) / 3600


def check_sources(sources: Sequence[MidiSource]) -> None:
    """Refuse a source that is a pool package or held out for evaluating the models."""
    pool = {p.name for p in POOL_PACKAGES}
    for s in sources:
        check_not_held_out(s.package)
        if s.package in pool:
            raise ConfigError(f"{s.package} is in the unlabelled training pool; a real check "
                              f"must come from music the models have not heard")


def resolve_soundfont(soundfont: str | Path | None, debian_dir: Path) -> Path:
    """The soundfont to render with: ``soundfont`` or csound's GM bank (fetched)."""
    from rtagger.train.synth.grooves import GM_SOUNDFONTS

    if soundfont is None:
        path = debian_dir / "root" / SOUNDFONT_PACKAGE / SOUNDFONT_FILE
    else:
        path = Path(soundfont)
        if path.name.lower().startswith("musescore"):
            raise ConfigError(f"{path}: the MuseScore soundfonts are held out; never render "
                              f"a check with them")
        if path.name in GM_SOUNDFONTS:
            warnings.warn(f"{path.name} renders the synthetic training set: the check then "
                          f"measures the models on sounds they were trained on",
                          stacklevel=2)
    if not path.is_file():
        raise ConfigError(f"soundfont {path} not found")
    return path


def _stem(name: str) -> str:
    return re.sub(r"(\.midi?|\.kar)?(\.gz)?$", "", name, flags=re.IGNORECASE)


def source_files(source: MidiSource, root: Path) -> list[Path]:
    """The source's MIDI files under its unpacked ``root``, sorted, names unique."""
    files = sorted({f for g in source.globs for f in root.glob(g) if f.is_file()})
    stems = [_stem(f.name) for f in files]
    if len(set(stems)) != len(stems):
        raise ConfigError(f"{source.package}: two selected files share a name")
    return files


def render_track(data: bytes, midi, soundfont: Path, out_dir: Path, package: str,
                 name: str) -> tuple[str, str, float]:
    """Render one MIDI file: ``(audio path, MIDI path, seconds)`` relative to ``out_dir``.

    The MIDI bytes FluidSynth reads are kept beside the audio (decompressed), so the
    labels can be recomputed from exactly what was rendered.
    """
    from rtagger.train.synth.midi import duration_s
    from rtagger.train.synth.render import check_audio_file, render_audio

    audio_rel, midi_rel = f"audio/{package}/{name}.flac", f"midi/{package}/{name}.mid"
    scratch = out_dir / ".scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{name}-", dir=scratch) as tmp:
        work = Path(tmp)
        midi_path = work / "track.mid"
        midi_path.write_bytes(data)
        samples = render_audio(midi_path, soundfont, duration_s(midi), work)
        with atomic_path(out_dir / midi_rel) as part:
            shutil.copyfile(midi_path, part)
        with atomic_path(out_dir / audio_rel) as part:
            write_flac(part, samples)
            seconds = check_audio_file(part, len(samples))
    return audio_rel, midi_rel, seconds


def build_realchecks(out_dir: str | Path, *, packages: Sequence[str] | None = None,
                     soundfont: str | Path | None = None, limit: int | None = None,
                     sources: Sequence[MidiSource] | None = None,
                     progress: bool = True) -> RealcheckReport:
    """Fetch, render and label the MIDI check into ``out_dir`` (manifest ``manifest.jsonl``).

    ``packages``: only these of ``sources`` (default :data:`SOURCES`); ``limit``: at most
    this many files per package (for trying it out); ``soundfont``: another GM soundfont
    than csound's (the training set's fonts are warned about, MuseScore's refused).
    """
    from rtagger.train.synth.grooves import SynthError

    t0 = time.monotonic()
    out = Path(out_dir)
    debian_dir = out / "debian"
    sources = list(SOURCES if sources is None else sources)
    if packages:
        unknown = sorted(set(packages) - {s.package for s in sources})
        if unknown:
            raise ConfigError(f"not check sources: {', '.join(unknown)}; choose among "
                              f"{', '.join(s.package for s in sources)}")
        sources = [s for s in sources if s.package in set(packages)]
    check_sources(sources)
    if shutil.which("fluidsynth") is None:
        raise ConfigError("fluidsynth is needed to render the checks (apt-get install "
                          "fluidsynth)")
    wanted = [s.package for s in sources] + ([SOUNDFONT_PACKAGE] if soundfont is None else [])
    status = fetch_packages(debian_dir, wanted)
    font = resolve_soundfont(soundfont, debian_dir)
    records = fetched(debian_dir)
    font_info = {"soundfont": font.name, "soundfont_sha256": file_sha256(str(font))}
    if soundfont is None:
        font_info.update(soundfont_package=SOUNDFONT_PACKAGE,
                         soundfont_version=records[SOUNDFONT_PACKAGE]["version"])
    manifest = out / "manifest.jsonl"
    kept = read_manifest(manifest) if manifest.is_file() else []
    done = {t.id for t in kept}
    prints = {t.extra.get("notes_sha256") for t in kept}
    report = RealcheckReport(manifest, font.name, n_kept=len(kept),
                             packages={n: status[n] for n in wanted})
    todo = []
    for s in sources:
        if status.get(s.package) not in ("fetched", "present"):
            report.failures.append((s.package, status.get(s.package, "not fetched")))
            continue
        root = debian_dir / "root" / s.package
        todo += [(s, root, f) for f in source_files(s, root)[:limit]]
    bar = Bar("rendering checks", len(todo), enabled=progress)
    with ManifestWriter(manifest, append=True) as writer:
        for s, root, f in todo:
            rel = f.relative_to(root).as_posix()
            track_id = f"{s.package}/{rel}"
            if track_id not in done:
                try:
                    track = _one_track(s, root, rel, font, out, records, font_info, prints)
                except (RealcheckError, SynthError, AudioError) as e:
                    log.error("%s: %s", track_id, e)
                    report.failures.append((track_id, str(e)))
                else:
                    if track is None:
                        report.duplicates.append(track_id)
                    else:
                        writer.write(track)
                        report.n_new += 1
            bar.advance()
    bar.close()
    failures = out / "failures.jsonl"
    if report.failures:
        atomic_write(failures, "".join(json.dumps({"id": i, "reason": r}) + "\n"
                                       for i, r in report.failures))
    else:
        failures.unlink(missing_ok=True)
    for t in read_manifest(manifest):
        pkg = t.extra["package"]
        report.tracks_by_package[pkg] = report.tracks_by_package.get(pkg, 0) + 1
        report.seconds_by_package[pkg] = report.seconds_by_package.get(pkg, 0.0) + t.duration
        for tag, y in t.extra["labels"].items():
            report.labels.setdefault(tag, [0, 0])[1 - y] += 1
    report.elapsed_s = time.monotonic() - t0
    return report


def _one_track(source: MidiSource, root: Path, rel: str, font: Path, out: Path, records: dict,
               font_info: dict, prints: set) -> Track | None:
    """The manifest record of one source file (rendered), or None for a duplicate."""
    package = source.package
    raw = midi_bytes((root / rel).read_bytes())
    midi = read_midi(raw, rel)
    if len(midi.tracks) > FLUIDSYNTH_MAX_TRACKS:
        midi = merged(midi)  # the same events as one track, which FluidSynth plays
        buf = io.BytesIO()
        midi.save(file=buf)
        raw = buf.getvalue()
    labels, shares, length = midi_labels(midi)
    if length < MIN_TRACK_S:
        raise RealcheckError(f"{length:.1f} s of music, under {MIN_TRACK_S:.0f} s")
    fingerprint = notes_fingerprint(midi)
    if fingerprint in prints:
        return None
    prints.add(fingerprint)
    audio, midi_rel, seconds = render_track(raw, midi, font, out, package, _stem(rel.rsplit(
        "/", 1)[-1]))
    positives = [t for t in CHECK_TAGS if labels.get(t) == 1]
    return Track(
        id=f"{package}/{rel}", path=str(out / audio), tags=tuple(positives), split=SPLIT,
        duration=round(seconds, 3),
        extra={"package": package, "version": records[package]["version"],
               "licence": source.licence or copyright_of(root, package).for_file(rel),
               "source": rel,
               "check": "midi-render", "rules": RULES_VERSION,
               "labels": {t: labels[t] for t in CHECK_TAGS if t in labels},
               "shares": shares, "midi": midi_rel, "midi_sha256": hashlib.sha256(
                   raw).hexdigest(), "notes_sha256": fingerprint, "music_s": round(length, 3),
               "sample_rate": SAMPLE_RATE, **font_info})


def print_report(report: RealcheckReport, console) -> None:
    """The rich summary the CLI prints."""
    from rich.table import Table

    table = Table(title=f"Real checks -> {report.manifest} (soundfont {report.soundfont})")
    for col, justify in (("package", "left"), ("tracks", "right"), ("hours", "right")):
        table.add_column(col, justify=justify)
    for pkg, n in sorted(report.tracks_by_package.items(), key=lambda kv: -kv[1]):
        table.add_row(pkg, str(n), f"{report.seconds_by_package[pkg] / 3600:.2f}")
    table.add_row("[bold]total[/]", f"[bold]{report.n_tracks}[/]", f"[bold]{report.hours:.2f}[/]")
    console.print(table)
    console.print("labels (positive/negative): " + ", ".join(
        f"{t} {p}/{n}" for t, (p, n) in sorted(report.labels.items(),
                                                key=lambda kv: CHECK_TAGS.index(kv[0]))))
    console.print(f"{report.n_new} new, {report.n_kept} kept from an earlier run, "
                  f"{len(report.duplicates)} duplicate(s) skipped; built in "
                  f"{report.elapsed_s:.1f} s")
    if report.failures:
        console.print(f"[red]{len(report.failures)} failure(s):[/]")
        for i, reason in report.failures:
            console.print(f"  {i}: {reason}", markup=False, highlight=False)
