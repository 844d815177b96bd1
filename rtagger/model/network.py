"""Models: the Music Tagging Transformer for 3.69 s windows and the track-context aggregator.

``ChunkTagger`` (Won, Choi & Serra, ISMIR 2021): waveform window -> log-mel (128 bands) ->
residual CNN front end (3x3 conv blocks; pooling (2,2),(2,2),(2,1) over (freq, time)) ->
flatten channels x bands and project to ``d_model`` -> CLS token + learned positions ->
pre-norm transformer encoder -> LayerNorm -> linear head. It returns per-window tag logits
and the CLS embedding.

``ContextAggregator`` (multiple-instance learning): a small transformer over the sequence of
window embeddings of a track or segment; its CLS gives track-level logits. Track labels
supervise it; windows carry none.

Sizes are named configs: ``teacher`` (the paper's), ``student`` (the real-time model, about
1/10 of the teacher's multiply-accumulates per window) and ``debug`` (tiny, for tests).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from rtagger.audio.decode import FRAMES_PER_WINDOW, N_MELS, WINDOW_SAMPLES
from rtagger.errors import ConfigError
from rtagger.model.features import LogMel


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

    def __post_init__(self) -> None:
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


@dataclass(frozen=True)
class AggregatorConfig:
    n_tags: int
    d_in: int  # embedding size of the window tagger
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    ff_mult: int = 4
    dropout: float = 0.1
    max_windows: int = 64  # bounded context: windows the aggregator attends over
    # A mean-pooling path: a linear head on the mean window embedding (initialised from the
    # tagger's head, so it starts as mean-pooled window logits) that the transformer,
    # initialised to add nothing, learns to correct.
    mean_skip: bool = False

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model {self.d_model} is not divisible by n_heads "
                              f"{self.n_heads}")


# Sizes are named by size; roles (teacher, student) are what a recipe does with one. "large"
# is the paper's teacher, "small" the real-time student, "tiny" the CPU experiment's
# distilled student, "debug" the tests' model.
SIZES: dict[str, dict] = {
    "large": {"conv_channels": 128, "d_model": 256, "n_layers": 4, "n_heads": 8},
    "small": {"conv_channels": 32, "d_model": 128, "n_layers": 2, "n_heads": 4},
    "tiny": {"conv_channels": 6, "d_model": 64, "n_layers": 1, "n_heads": 4, "ff_mult": 2},
    "debug": {"conv_channels": 8, "d_model": 32, "n_layers": 1, "n_heads": 2, "ff_mult": 2},
}
AGGREGATOR_SIZES: dict[str, dict] = {
    "large": {"d_model": 128, "n_layers": 2, "n_heads": 4},
    "small": {"d_model": 128, "n_layers": 2, "n_heads": 4},
    "tiny": {"d_model": 64, "n_layers": 1, "n_heads": 4, "ff_mult": 2},
    "debug": {"d_model": 32, "n_layers": 1, "n_heads": 2, "ff_mult": 2, "max_windows": 16},
}
# The role names sizes had before they were named by size.
RENAMED_SIZES = {"teacher": "large", "student": "small"}


def _size(size: str, table: dict[str, dict]) -> dict:
    if size in RENAMED_SIZES:
        raise ConfigError(f"model size {size!r} is now called {RENAMED_SIZES[size]!r} (sizes "
                          f"are named by size: {', '.join(SIZES)})")
    if size not in table:
        raise ConfigError(f"unknown model size {size!r}; choose one of {', '.join(SIZES)}")
    return table[size]


def tagger_config(size: str, n_tags: int, **overrides) -> TaggerConfig:
    return TaggerConfig(n_tags=n_tags, **{**_size(size, SIZES), **overrides})


def aggregator_config(size: str, n_tags: int, d_in: int, **overrides) -> AggregatorConfig:
    return AggregatorConfig(n_tags=n_tags, d_in=d_in,
                            **{**_size(size, AGGREGATOR_SIZES), **overrides})


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
    ``forward_mel(mel)`` takes ``(batch, n_mels, frames)`` dB log-mels instead.
    """

    def __init__(self, cfg: TaggerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.mel = LogMel(n_mels=cfg.n_mels)
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
        if mel_transform is not None:
            mel = mel_transform(mel)
        return self.forward_mel(mel)

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


class ContextAggregator(nn.Module):
    """Track-level tags from a sequence of window embeddings.

    ``forward(emb, valid)``: ``emb`` (batch, windows, d_in), ``valid`` (batch, windows) bool
    (True for real windows; None = all valid) -> track logits (batch, n_tags). Sequences
    longer than ``max_windows`` must be reduced by the caller (see
    :class:`rtagger.pipeline.aggregate.TrackContext`).
    """

    def __init__(self, cfg: AggregatorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.inp = nn.Sequential(nn.LayerNorm(cfg.d_in), nn.Linear(cfg.d_in, cfg.d_model))
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.d_model))
        self.pos = nn.Parameter(torch.zeros(1, cfg.max_windows + 1, cfg.d_model))
        self.blocks = nn.ModuleList(
            Block(cfg.d_model, cfg.n_heads, cfg.ff_mult, cfg.dropout, 0.0)
            for _ in range(cfg.n_layers)
        )
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.n_tags)
        nn.init.trunc_normal_(self.pos, std=0.02)
        nn.init.trunc_normal_(self.cls, std=0.02)
        if cfg.mean_skip:
            self.skip = nn.Linear(cfg.d_in, cfg.n_tags)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, emb: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = emb.shape
        if t > self.cfg.max_windows:
            raise ConfigError(f"{t} windows exceed the aggregator context "
                              f"({self.cfg.max_windows})")
        x = self.inp(emb)
        x = torch.cat([self.cls.expand(b, -1, -1), x], dim=1) + self.pos[:, : t + 1]
        pad = None
        if valid is not None:
            pad = torch.cat([valid.new_zeros(b, 1), ~valid], dim=1)  # CLS is never padded
        for blk in self.blocks:
            x = blk(x, pad)
        out = self.head(self.norm(x[:, 0]))
        if self.cfg.mean_skip:
            if valid is None:
                mean = emb.mean(dim=1)
            else:
                w = valid.to(emb.dtype).unsqueeze(-1)
                mean = (emb * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)
            out = out + self.skip(mean)
        return out


# --- size report --------------------------------------------------------------------------


def count_macs(model: nn.Module, *inputs: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass, counted with hooks.

    Counts convolutions, linear layers, attention matmuls (QK^T and AV) and the mel
    projection/STFT; ignores element-wise work (norms, activations), which is small.
    """
    total = 0

    def conv_hook(m: nn.Conv2d, _inp, out):
        nonlocal total
        kh, kw = m.kernel_size
        total += out.numel() * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, _inp, out):
        nonlocal total
        total += out.numel() * m.in_features

    def attn_hook(m: SelfAttention, inp, _out):
        nonlocal total
        b, t, d = inp[0].shape
        total += 2 * b * t * t * d  # scores and weighted sum, summed over heads

    def mel_hook(m: LogMel, inp, out):
        nonlocal total
        b, n_mels, frames = out.shape
        n_bins = m.n_fft // 2 + 1
        # real FFT ~ (n_fft/2) log2(n_fft) complex MACs per frame; filterbank matmul
        fft = (m.n_fft // 2) * int(torch.log2(torch.tensor(m.n_fft)).item()) * 4
        total += b * frames * (fft + n_bins * n_mels)

    hooks = []
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d):
            hooks.append(mod.register_forward_hook(conv_hook))
        elif isinstance(mod, nn.Linear):
            hooks.append(mod.register_forward_hook(linear_hook))
        elif isinstance(mod, SelfAttention):
            hooks.append(mod.register_forward_hook(attn_hook))
        elif isinstance(mod, LogMel):
            hooks.append(mod.register_forward_hook(mel_hook))
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(*inputs)
        model.train(was_training)
    finally:
        for h in hooks:
            h.remove()
    return total


def tagger_cost(tagger: ChunkTagger) -> dict:
    """Parameters and multiply-accumulates per 3.69 s window of a window tagger."""
    return {"params": sum(p.numel() for p in tagger.parameters()),
            "macs_per_window": count_macs(tagger, torch.zeros(1, WINDOW_SAMPLES))}


def size_report(n_tags: int = 36) -> list[dict]:
    """Parameters and MACs per window (tagger) and per 64-window context (aggregator)."""
    rows = []
    for size in SIZES:
        tagger = ChunkTagger(tagger_config(size, n_tags))
        agg = ContextAggregator(aggregator_config(size, n_tags, tagger.cfg.d_model))
        ctx = torch.zeros(1, agg.cfg.max_windows, tagger.cfg.d_model)
        cost = tagger_cost(tagger)
        rows.append({
            "size": size,
            "tagger_params": cost["params"],
            "tagger_macs_per_window": cost["macs_per_window"],
            "aggregator_params": sum(p.numel() for p in agg.parameters()),
            "aggregator_macs_full_context": count_macs(agg, ctx),
            "aggregator_context_windows": agg.cfg.max_windows,
        })
    return rows
