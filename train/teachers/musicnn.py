"""musicnn 0.1.0's taggers in torch: its mel front end, the musicnn and vgg networks, loading.

Pons & Serra's musicnn package (ISC licence, see ``LICENSE-musicnn`` beside this file) ships
four TensorFlow models trained on real labelled music: ``MTT_musicnn`` and ``MTT_vgg``
(MagnaTagATune top-50) and ``MSD_musicnn`` and ``MSD_vgg`` (Million Song Dataset top-50).
This module re-implements what they compute, for frozen inference only (no dropout):

- input: 16 kHz mono; librosa's ``melspectrogram`` (n_fft 512, hop 256, 96 Slaney mel bands
  to 8 kHz, power 2, centred STFT with zero padding as librosa >= 0.10 does), then
  ``log10(10000 * mel + 1)`` **in float32**. musicnn's own ``batch_data()`` casts the mel to
  float16 first, so every cell above 6.55 overflows to inf and such a patch gives the same
  tags whatever the music; that defect is not reproduced.
- patches: 187 frames (3 s), cut from the track's spectrogram every ``hop_frames`` frames
  starting at frame 0; only whole patches, as musicnn's extractor does.
- networks: ``(batch, frames, 96)`` -> ``(batch, 50)`` logits; sigmoid gives musicnn's
  taggram. The vgg network needs exactly 187 frames; musicnn pools over time and takes any
  length of at least one frame.

Tensor names and layouts are torch's own; :mod:`rtagger.train.teachers.convert` maps the
TensorFlow variables onto them. A converted teacher is one ``.safetensors`` file whose
header carries its description (architecture, tags, provenance, weights checksum), so
:func:`load_teacher` rebuilds it from the file alone.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rtagger.audio import decode as audio
from rtagger.errors import CheckpointError, ConfigError
from rtagger.model.checkpoint import weights_sha256
from rtagger.model.features import mel_filterbank

SAMPLE_RATE = 16_000  # Hz
N_FFT = 512  # samples
HOP_LENGTH = 256  # samples between frames
N_MELS = 96
F_MAX_HZ = SAMPLE_RATE / 2
PATCH_S = 3.0  # seconds per patch: what the models were trained on
# librosa.time_to_frames(3 s) + 1, as musicnn's extractor derives its patch length.
PATCH_FRAMES = int((PATCH_S * SAMPLE_RATE - N_FFT // 2) // HOP_LENGTH) + 1
LOG_GAIN = 10_000.0  # musicnn's "logC" compression: log10(LOG_GAIN * mel + 1)
BN_EPS = 1e-3  # tf.compat.v1.layers.batch_normalization's default epsilon
assert SAMPLE_RATE == audio.SAMPLE_RATE
assert PATCH_FRAMES == 187

TEACHER_FORMAT = "rtagger-teacher"
TEACHER_FORMAT_VERSION = 1
META_KEY = "rtagger_teacher"

# musicnn 0.1.0 configuration.py: output order of the MTT and MSD models.
MTT_TAGS = (
    "guitar", "classical", "slow", "techno", "strings", "drums", "electronic", "rock", "fast",
    "piano", "ambient", "beat", "violin", "vocal", "synth", "female", "indian", "opera",
    "male", "singing", "vocals", "no vocals", "harpsichord", "loud", "quiet", "flute",
    "woman", "male vocal", "no vocal", "pop", "soft", "sitar", "solo", "man", "classic",
    "choir", "voice", "new age", "dance", "male voice", "female vocal", "beats", "harp",
    "cello", "no voice", "weird", "country", "metal", "female voice", "choral",
)
MSD_TAGS = (
    "rock", "pop", "alternative", "indie", "electronic", "female vocalists", "dance", "00s",
    "alternative rock", "jazz", "beautiful", "metal", "chillout", "male vocalists",
    "classic rock", "soul", "indie rock", "Mellow", "electronica", "80s", "folk", "90s",
    "chill", "instrumental", "punk", "oldies", "blues", "hard rock", "ambient", "acoustic",
    "experimental", "female vocalist", "guitar", "Hip-Hop", "70s", "party", "country",
    "easy listening", "sexy", "catchy", "funk", "electro", "heavy metal", "Progressive rock",
    "60s", "rnb", "indie pop", "sad", "House", "happy",
)
TEACHER_NAMES = ("MTT_musicnn", "MTT_vgg", "MSD_musicnn", "MSD_vgg")


@dataclass(frozen=True)
class TeacherConfig:
    """Architecture of one teacher; saved in its file, enough to rebuild the network."""

    arch: str  # "musicnn" or "vgg"
    n_tags: int = 50
    n_mels: int = N_MELS
    patch_frames: int = PATCH_FRAMES
    midend_filters: int = 64  # musicnn: filters of each mid-end conv
    backend_units: int = 200  # musicnn: units of the penultimate dense layer
    vgg_filters: int = 128  # vgg: filters of every conv


def teacher_config(name: str) -> TeacherConfig:
    """The configuration musicnn 0.1.0 gives the shipped model ``name``."""
    if name not in TEACHER_NAMES:
        raise ConfigError(f"unknown teacher {name!r}; one of {', '.join(TEACHER_NAMES)}")
    return TeacherConfig(arch=name.split("_")[1])


def teacher_tags(name: str) -> tuple[str, ...]:
    return MTT_TAGS if name.startswith("MTT_") else MSD_TAGS


def compress(mel: torch.Tensor) -> torch.Tensor:
    """musicnn's ``log10(10000 * mel + 1)``, computed in float32 (never float16: it
    overflows above mel 6.55)."""
    return torch.log10(LOG_GAIN * mel.float() + 1.0)


class MusicnnMel(nn.Module):
    """``(batch, samples)`` at 16 kHz -> ``(batch, frames, 96)`` compressed mel, float32.

    ``frames = 1 + samples // 256`` (centred STFT, zero padded at both ends).
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("window", torch.hann_window(N_FFT, periodic=True),
                             persistent=False)
        fbank = mel_filterbank(SAMPLE_RATE, N_FFT, N_MELS, 0.0, F_MAX_HZ).to(torch.float32)
        self.register_buffer("fbank", fbank, persistent=False)

    def power(self, wave: torch.Tensor) -> torch.Tensor:
        """The mel power before compression, ``(batch, frames, 96)``."""
        with torch.autocast(device_type=wave.device.type, enabled=False):
            spec = torch.stft(wave.float(), n_fft=N_FFT, hop_length=HOP_LENGTH,
                              window=self.window, center=True, pad_mode="constant",
                              return_complex=True)
            power = spec.real.square() + spec.imag.square()  # (B, n_fft//2+1, frames)
            return torch.matmul(self.fbank, power).transpose(1, 2)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return compress(self.power(wave))


def patches(spec: torch.Tensor, hop_frames: int = PATCH_FRAMES,
            patch_frames: int = PATCH_FRAMES) -> torch.Tensor:
    """Cut ``(frames, mels)`` into ``(n, patch_frames, mels)`` starting at frame 0 every
    ``hop_frames``; a tail shorter than a patch is dropped (musicnn's ``batch_data``)."""
    if hop_frames < 1:
        raise ConfigError(f"hop_frames must be >= 1, got {hop_frames}")
    if spec.shape[0] < patch_frames:
        raise ConfigError(f"{spec.shape[0]} frames is shorter than one {patch_frames}-frame "
                          f"patch ({PATCH_S:g} s)")
    return spec.unfold(0, patch_frames, hop_frames).transpose(1, 2).contiguous()


def _conv_bn(conv: nn.Module, bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """musicnn's order everywhere: conv, ReLU, then batch norm."""
    return bn(F.relu(conv(x)))


class Musicnn(nn.Module):
    """Musically motivated CNN: timbral (7x38, 7x67) and temporal (128, 64, 32 frames) front
    end, max-pooled over frequency; three dense-residual 1-D convs; max+mean over time; two
    dense layers. ``(batch, frames, 96)`` -> ``(batch, n_tags)`` logits."""

    TIMBRAL_FREQ = (0.4, 0.7)  # kernel heights as fractions of the mel bands
    TEMPORAL_FRAMES = (128, 64, 32)
    TIMBRAL_FILTERS = int(1.6 * 128)
    TEMPORAL_FILTERS = int(1.6 * 32)

    def __init__(self, cfg: TeacherConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.bn_input = nn.BatchNorm2d(1, eps=BN_EPS)
        self.timbral = nn.ModuleList(
            nn.Conv2d(1, self.TIMBRAL_FILTERS, (7, int(f * cfg.n_mels)))
            for f in self.TIMBRAL_FREQ)
        self.bn_timbral = nn.ModuleList(nn.BatchNorm2d(self.TIMBRAL_FILTERS, eps=BN_EPS)
                                        for _ in self.TIMBRAL_FREQ)
        self.temporal = nn.ModuleList(nn.Conv2d(1, self.TEMPORAL_FILTERS, (k, 1))
                                      for k in self.TEMPORAL_FRAMES)
        self.bn_temporal = nn.ModuleList(nn.BatchNorm2d(self.TEMPORAL_FILTERS, eps=BN_EPS)
                                         for _ in self.TEMPORAL_FRAMES)
        front = (len(self.TIMBRAL_FREQ) * self.TIMBRAL_FILTERS
                 + len(self.TEMPORAL_FRAMES) * self.TEMPORAL_FILTERS)
        m = cfg.midend_filters
        self.midend = nn.ModuleList(nn.Conv1d(c, m, 7, padding=3) for c in (front, m, m))
        self.bn_midend = nn.ModuleList(nn.BatchNorm1d(m, eps=BN_EPS) for _ in range(3))
        pooled = 2 * (front + 3 * m)  # max and mean of every front- and mid-end channel
        self.bn_pool = nn.BatchNorm1d(pooled, eps=BN_EPS)
        self.dense = nn.Linear(pooled, cfg.backend_units)
        self.bn_dense = nn.BatchNorm1d(cfg.backend_units, eps=BN_EPS)
        self.out = nn.Linear(cfg.backend_units, cfg.n_tags)

    def features(self, spec: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named activations: ``front`` and ``midend`` ``(batch, channels, frames)``,
        ``max_pool``/``mean_pool`` ``(batch, channels)``, ``penultimate``, ``logits``."""
        x = self.bn_input(spec.unsqueeze(1))  # (B, 1, frames, mels)
        maps = []
        padded = F.pad(x, (0, 0, 3, 3))  # 'same' in time only: frequency is pooled away
        for conv, bn in zip(self.timbral, self.bn_timbral, strict=True):
            maps.append(_conv_bn(conv, bn, padded).amax(dim=3))
        for conv, bn, k in zip(self.temporal, self.bn_temporal, self.TEMPORAL_FRAMES,
                               strict=True):
            # TensorFlow's 'same' puts the odd extra frame of an even kernel after.
            same = F.pad(x, (0, 0, (k - 1) // 2, k - 1 - (k - 1) // 2))
            maps.append(_conv_bn(conv, bn, same).amax(dim=3))
        front = torch.cat(maps, dim=1)  # (B, 561, frames)
        h = _conv_bn(self.midend[0], self.bn_midend[0], front)
        mid = [h]
        for conv, bn in zip(self.midend[1:], self.bn_midend[1:], strict=True):
            h = _conv_bn(conv, bn, h) + h
            mid.append(h)
        dense = torch.cat([front, *mid], dim=1)  # (B, 753, frames)
        max_pool, mean_pool = dense.amax(dim=2), dense.mean(dim=2)
        # TensorFlow flattened (channels, [max, mean]): the two pools interleave.
        pooled = torch.stack([max_pool, mean_pool], dim=2).flatten(1)
        penultimate = self.bn_dense(F.relu(self.dense(self.bn_pool(pooled))))
        return {"front": front, "midend": torch.cat(mid, dim=1), "max_pool": max_pool,
                "mean_pool": mean_pool, "penultimate": penultimate,
                "logits": self.out(penultimate)}

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        return self.features(spec)["logits"]


class Vgg(nn.Module):
    """Five 3x3 convs with batch norm and max pooling, then one dense layer.
    ``(batch, 187, 96)`` -> ``(batch, n_tags)`` logits."""

    POOLS = (((4, 1), (2, 2)), ((2, 2), (2, 2)), ((2, 2), (2, 2)), ((2, 2), (2, 2)),
             ((4, 4), (4, 4)))  # (kernel, stride) after each conv, in (frames, mels)

    def __init__(self, cfg: TeacherConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.vgg_filters
        self.bn_input = nn.BatchNorm2d(1, eps=BN_EPS)
        self.convs = nn.ModuleList(nn.Conv2d(1 if i == 0 else c, c, 3, padding=1)
                                   for i in range(len(self.POOLS)))
        self.bns = nn.ModuleList(nn.BatchNorm2d(c, eps=BN_EPS) for _ in self.POOLS)
        self.pools = nn.ModuleList(nn.MaxPool2d(k, s) for k, s in self.POOLS)
        t, f = cfg.patch_frames, cfg.n_mels
        for (kt, kf), (st, sf) in self.POOLS:
            t, f = (t - kt) // st + 1, (f - kf) // sf + 1
        self.out = nn.Linear(c * t * f, cfg.n_tags)

    def features(self, spec: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named activations: ``pool1``..``pool5`` ``(batch, filters, frames, mels)`` and
        ``logits``."""
        if spec.shape[1] != self.cfg.patch_frames:
            raise ConfigError(f"the vgg teacher takes {self.cfg.patch_frames}-frame patches, "
                              f"got {spec.shape[1]} frames")
        x = self.bn_input(spec.unsqueeze(1))
        out: dict[str, torch.Tensor] = {}
        for i, (conv, bn, pool) in enumerate(zip(self.convs, self.bns, self.pools,
                                                 strict=True)):
            x = pool(_conv_bn(conv, bn, x))
            out[f"pool{i + 1}"] = x
        # TensorFlow flattened channels-last (frames, mels, filters).
        out["logits"] = self.out(x.permute(0, 2, 3, 1).flatten(1))
        return out

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        return self.features(spec)["logits"]


def build_network(cfg: TeacherConfig) -> nn.Module:
    if cfg.arch == "musicnn":
        return Musicnn(cfg)
    if cfg.arch == "vgg":
        return Vgg(cfg)
    raise ConfigError(f"unknown teacher architecture {cfg.arch!r} (musicnn or vgg)")


class Teacher(nn.Module):
    """A converted musicnn teacher: front end + network + its tags and description."""

    def __init__(self, name: str, cfg: TeacherConfig, tags: tuple[str, ...],
                 provenance: dict | None = None) -> None:
        super().__init__()
        if len(tags) != cfg.n_tags:
            raise ConfigError(f"{len(tags)} tags for a {cfg.n_tags}-tag network")
        self.name = name
        self.cfg = cfg
        self.tags = tuple(tags)
        self.provenance = dict(provenance or {})
        self.mel = MusicnnMel()
        self.net = build_network(cfg)
        self.eval()

    def forward(self, wave: torch.Tensor, hop_frames: int = PATCH_FRAMES) -> torch.Tensor:
        """``(batch, samples)`` at 16 kHz -> ``(batch, patches, n_tags)`` probabilities of
        the 3 s patches of each row (needs ``samples >= 47,616``)."""
        spec = self.mel(wave)
        cut = torch.stack([patches(s, hop_frames, self.cfg.patch_frames) for s in spec])
        b, n = cut.shape[:2]
        return torch.sigmoid(self.net(cut.flatten(0, 1))).reshape(b, n, -1)

    @torch.inference_mode()
    def taggram(self, wave: torch.Tensor, hop_frames: int = PATCH_FRAMES,
                batch: int = 64) -> torch.Tensor:
        """A whole track ``(samples,)`` -> ``(patches, n_tags)`` probabilities, like
        musicnn's ``extractor`` (one spectrogram, patches every ``hop_frames``)."""
        dev = self.mel.fbank.device
        cut = patches(self.mel(wave.reshape(1, -1).to(dev))[0], hop_frames,
                      self.cfg.patch_frames)
        return torch.cat([torch.sigmoid(self.net(cut[i:i + batch]))
                          for i in range(0, cut.shape[0], batch)])

    def describe(self) -> dict:
        return {
            "format": TEACHER_FORMAT,
            "format_version": TEACHER_FORMAT_VERSION,
            "name": self.name,
            "architecture": asdict(self.cfg),
            "tags": list(self.tags),
            "input": {"sample_rate": SAMPLE_RATE, "n_fft": N_FFT, "hop_length": HOP_LENGTH,
                      "n_mels": N_MELS, "f_max": F_MAX_HZ, "mel": "slaney",
                      "stft_padding": "zeros", "compression": "log10(10000*mel+1), float32",
                      "patch_frames": self.cfg.patch_frames, "patch_s": PATCH_S},
            "provenance": dict(self.provenance),
            "weights_sha256": weights_sha256(self.net.state_dict()),
        }


def read_description(path: str | Path) -> dict:
    """The JSON description in a converted teacher's header (no weights are read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(str(path), f"not a readable safetensors file ({e})") from e
    if META_KEY not in meta:
        raise CheckpointError(str(path), "not a converted teacher (no rtagger_teacher header)")
    desc = json.loads(meta[META_KEY])
    if desc.get("format") != TEACHER_FORMAT:
        raise CheckpointError(str(path), f"format {desc.get('format')!r} is not a teacher's")
    if desc.get("format_version", 0) > TEACHER_FORMAT_VERSION:
        raise CheckpointError(str(path), f"teacher format {desc['format_version']} is newer "
                                         "than this code reads")
    return desc


def load_teacher(path: str | Path, device: str = "cpu") -> Teacher:
    """Rebuild a converted teacher from its file; refuses a file whose weights do not match
    its recorded checksum or architecture."""
    from safetensors.torch import load_file

    desc = read_description(path)
    teacher = Teacher(desc["name"], TeacherConfig(**desc["architecture"]), tuple(desc["tags"]),
                      desc.get("provenance", {}))
    state = load_file(str(path))
    if weights_sha256(state) != desc["weights_sha256"]:
        raise CheckpointError(str(path), "weights do not match their recorded sha256")
    try:
        teacher.net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(str(path), f"weights do not fit the architecture: {e}") from e
    return teacher.to(device).eval()
