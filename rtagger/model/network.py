"""The window tagger: the Music Tagging Transformer for 3.69 s windows.

``ChunkTagger`` (Won, Choi & Serra, ISMIR 2021): waveform window -> log-mel (128 bands) ->
residual CNN front end (3x3 conv blocks; pooling (2,2),(2,2),(2,1) over (freq, time)) ->
flatten channels x bands and project to ``d_model`` -> CLS token + learned positions ->
pre-norm transformer encoder -> LayerNorm -> linear head. It returns per-window tag logits
and the CLS embedding.

The track-context aggregator that reads these embeddings is in
:mod:`rtagger.model.aggregator`. Sizes are named configs: ``large`` (the paper's teacher),
``small`` (the real-time student, about 1/10 of its multiply-accumulates per window),
``tiny`` and ``debug`` (for tests).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from rtagger.audio.decode import FRAMES_PER_WINDOW, N_MELS
from rtagger.errors import ConfigError
from rtagger.model.features import CHROMA_BINS, TEMPO_BINS, Chroma, LogMel, Tempo


@dataclass(frozen=True)
class TaggerConfig:
    n_tags: int
    n_mels: int = N_MELS
    frames: int = FRAMES_PER_WINDOW  # mel frames per window
    conv_channels: int = 128
    pools: tuple[tuple[int, int], ...] = ((2, 2), (2, 2), (2, 1))  # (freq, time) per block
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 8
    ff_mult: int = 4
    dropout: float = 0.1
    drop_path: float = 0.0  # stochastic depth (noisy-student training)
    pooling: str = "cls"  # "cls" (the paper) or "mean" over tokens (CNN-only baseline)
    # 12: the window's chroma profile (rtagger.model.features.Chroma) follows the CLS
    # embedding in the embedding output, for a context aggregator that needs key and mode.
    chroma_bins: int = 0
    # 16: the window's onset periodicity (rtagger.model.features.Tempo) comes last, for an
    # aggregator that needs tempo changes.
    tempo_bins: int = 0

    def __post_init__(self) -> None:
        check_profile_bins(self.chroma_bins, self.tempo_bins)
        if self.pooling not in ("cls", "mean"):
            raise ConfigError(f"pooling must be 'cls' or 'mean', got {self.pooling!r}")
        if self.pooling == "cls" and self.n_layers == 0:
            raise ConfigError("a CLS token needs transformer layers; use pooling='mean'")
        if self.n_tags <= 0:
            raise ConfigError(f"n_tags must be positive, got {self.n_tags}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model {self.d_model} is not divisible by n_heads "
                              f"{self.n_heads}")

    @property
    def embedding_dim(self) -> int:
        """Size of the embedding output: the CLS embedding, then the chroma profile and the
        tempo profile if any."""
        return self.d_model + self.chroma_bins + self.tempo_bins

    @property
    def tokens(self) -> int:
        """Transformer sequence length after the CNN front end (without the CLS token)."""
        t = self.frames
        for _, pt in self.pools:
            t = -(-t // pt)  # stride-s 3x3 conv with padding 1 gives ceil(n / s)
        return t

    @property
    def bands_out(self) -> int:
        f = self.n_mels
        for pf, _ in self.pools:
            f = -(-f // pf)
        return f


def check_profile_bins(chroma_bins: int, tempo_bins: int) -> None:
    if chroma_bins not in (0, CHROMA_BINS):
        raise ConfigError(f"chroma_bins must be 0 or {CHROMA_BINS}, got {chroma_bins}")
    if tempo_bins not in (0, TEMPO_BINS):
        raise ConfigError(f"tempo_bins must be 0 or {TEMPO_BINS}, got {tempo_bins}")


# Sizes are named by size; roles (teacher, student) are what a recipe does with one. "large"
# is the paper's teacher, "small" the real-time student, "tiny" the CPU experiment's
# distilled student, "debug" the tests' model.
SIZES: dict[str, dict] = {
    "large": {"conv_channels": 128, "d_model": 256, "n_layers": 4, "n_heads": 8},
    "small": {"conv_channels": 32, "d_model": 128, "n_layers": 2, "n_heads": 4},
    "tiny": {"conv_channels": 6, "d_model": 64, "n_layers": 1, "n_heads": 4, "ff_mult": 2},
    "debug": {"conv_channels": 8, "d_model": 32, "n_layers": 1, "n_heads": 2, "ff_mult": 2},
}
# The role names sizes had before they were named by size.
RENAMED_SIZES = {"teacher": "large", "student": "small"}


def named_size(size: str, table: dict[str, dict]) -> dict:
    if size in RENAMED_SIZES:
        raise ConfigError(f"model size {size!r} is now called {RENAMED_SIZES[size]!r} (sizes "
                          f"are named by size: {', '.join(SIZES)})")
    if size not in table:
        raise ConfigError(f"unknown model size {size!r}; choose one of {', '.join(SIZES)}")
    return table[size]


def tagger_config(size: str, n_tags: int, **overrides) -> TaggerConfig:
    return TaggerConfig(n_tags=n_tags, **{**named_size(size, SIZES), **overrides})


def config_from_dict(cls, d: dict):
    """Rebuild a config dataclass from JSON (lists back to tuples; unknown keys rejected)."""
    names = {f.name for f in fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(f"{cls.__name__} has no fields {sorted(unknown)}")
    kw = dict(d)
    if "pools" in kw:
        kw["pools"] = tuple(tuple(p) for p in kw["pools"])
    return cls(**kw)


def config_to_dict(cfg) -> dict:
    return asdict(cfg)


# --- building blocks ----------------------------------------------------------------------


class ResBlock2d(nn.Module):
    """conv3x3(stride) -> BN -> ReLU -> conv3x3 -> BN, plus a projected shortcut, -> ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: tuple[int, int]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class SelfAttention(nn.Module):
    def __init__(self, d: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: (batch, tokens, d); ``key_padding``: (batch, tokens) True where padded."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (b, heads, t, dh)
        mask = None
        if key_padding is not None:
            mask = (~key_padding)[:, None, None, :]  # True = attend
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm transformer layer (GELU feed-forward) with optional stochastic depth."""

    def __init__(self, d: int, n_heads: int, ff_mult: int, dropout: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = SelfAttention(d, n_heads, dropout)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(
            nn.Linear(d, ff_mult * d), nn.GELU(), nn.Dropout(dropout), nn.Linear(ff_mult * d, d)
        )
        self.drop = nn.Dropout(dropout)
        self.drop_path = drop_path

    def _residual(self, branch: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_path == 0.0:
            return branch
        keep = 1.0 - self.drop_path  # drop the whole branch per example
        mask = branch.new_empty(branch.shape[0], 1, 1).bernoulli_(keep)
        return branch * mask / keep

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self._residual(self.drop(self.attn(self.norm1(x), key_padding)))
        return x + self._residual(self.drop(self.mlp(self.norm2(x))))


class ChunkTagger(nn.Module):
    """Music Tagging Transformer for one window.

    ``forward(wave)``: ``(batch, WINDOW_SAMPLES)`` float32 at 16 kHz ->
    ``(logits (batch, n_tags), embedding (batch, d_model))``.
    ``forward_mel(mel)`` takes ``(batch, n_mels, frames)`` dB log-mels instead and returns
    the CLS embedding alone; with ``chroma_bins`` and ``tempo_bins`` the embedding of
    ``forward`` is ``(batch, embedding_dim)``, the window's chroma and tempo profiles
    appended (:meth:`with_features`).
    """

    def __init__(self, cfg: TaggerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.mel = LogMel(n_mels=cfg.n_mels)
        self.chroma = Chroma() if cfg.chroma_bins else None
        self.tempo = Tempo() if cfg.tempo_bins else None
        self.input_bn = nn.BatchNorm2d(1)  # learned input normalisation of the dB values
        blocks, c_in = [], 1
        for pool in cfg.pools:
            blocks.append(ResBlock2d(c_in, cfg.conv_channels, stride=pool))
            c_in = cfg.conv_channels
        self.frontend = nn.Sequential(*blocks)
        self.to_tokens = nn.Linear(cfg.conv_channels * cfg.bands_out, cfg.d_model)
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.d_model))
        self.pos = nn.Parameter(torch.zeros(1, cfg.tokens + 1, cfg.d_model))
        self.in_drop = nn.Dropout(cfg.dropout)
        dp = [cfg.drop_path * i / max(cfg.n_layers - 1, 1) for i in range(cfg.n_layers)]
        self.blocks = nn.ModuleList(
            Block(cfg.d_model, cfg.n_heads, cfg.ff_mult, cfg.dropout, p) for p in dp
        )
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.n_tags)
        nn.init.trunc_normal_(self.pos, std=0.02)
        nn.init.trunc_normal_(self.cls, std=0.02)

    def forward(self, wave: torch.Tensor,
                mel_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``mel_transform`` (training only) edits the log-mel, e.g. SpecAugment masks."""
        mel = self.mel(wave)
        logits, emb = self.forward_mel(mel if mel_transform is None else mel_transform(mel))
        return logits, self.with_features(emb, wave, mel)

    def with_features(self, emb: torch.Tensor, wave: torch.Tensor, mel: torch.Tensor,
                      chroma: nn.Module | None = None) -> torch.Tensor:
        """The embedding output: ``emb`` (the CLS embedding from :meth:`forward_mel`), then
        the windows' chroma profile (from ``wave``) and tempo profile (from their log-mel
        ``mel``) when the config has them. ``chroma`` replaces the tagger's own module (an
        export-friendly equivalent)."""
        parts = [emb]
        if self.chroma is not None:
            parts.append((chroma or self.chroma)(wave).to(emb.dtype))
        if self.tempo is not None:
            parts.append(self.tempo(mel).to(emb.dtype))
        return torch.cat(parts, dim=-1) if len(parts) > 1 else emb

    def forward_mel(self, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.input_bn(mel.unsqueeze(1))  # (B, 1, n_mels, frames)
        x = self.frontend(x)  # (B, C, bands_out, tokens)
        b, c, f, t = x.shape
        x = x.permute(0, 3, 1, 2).reshape(b, t, c * f)  # channels x bands per time step
        x = self.to_tokens(x)
        x = torch.cat([self.cls.expand(b, -1, -1), x], dim=1) + self.pos[:, : t + 1]
        x = self.in_drop(x)
        for blk in self.blocks:
            x = blk(x)
        emb = self.norm(x[:, 0] if self.cfg.pooling == "cls" else x[:, 1:].mean(dim=1))
        return self.head(emb), emb


def with_window_features(tagger: ChunkTagger, chroma: bool = True,
                         tempo: bool = False) -> ChunkTagger:
    """The same tagger (same weights, same logits) with the chroma and/or tempo profile
    after its embedding: neither has learned parameters, so any trained tagger can gain
    them. A profile the tagger has already stays."""
    cfg = tagger.cfg
    want = {"chroma_bins": CHROMA_BINS if chroma or cfg.chroma_bins else 0,
            "tempo_bins": TEMPO_BINS if tempo or cfg.tempo_bins else 0}
    if all(getattr(cfg, k) == v for k, v in want.items()):
        return tagger
    cfg = TaggerConfig(**{**asdict(cfg), **want})
    out = ChunkTagger(cfg)
    out.load_state_dict(tagger.state_dict())
    return out.train(tagger.training)
