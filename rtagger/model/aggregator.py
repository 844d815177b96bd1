"""The track-context aggregator: track tags from the sequence of window embeddings.

``ContextAggregator`` (multiple-instance learning): a small transformer over the window
embeddings of a track or segment (the tagger's CLS embeddings, with each window's chroma
and tempo profiles when the tagger has them); its CLS gives track-level logits. Track
labels supervise it; windows carry none. Sizes are named as the tagger's
(:data:`rtagger.model.network.SIZES`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rtagger.errors import ConfigError
from rtagger.model.features import CHROMA_BINS
from rtagger.model.network import Block, check_profile_bins, named_size


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
    # The last ``chroma_bins`` inputs of each window are its chroma profile (the tagger's
    # ``chroma_bins``): read through transposition-invariant tonal features (see
    # ContextAggregator), not as embedding dimensions.
    chroma_bins: int = 0
    tonal_templates: int = 16
    # The last ``tempo_bins`` inputs are the window's tempo profile (the tagger's
    # ``tempo_bins``), read as it is and as its deviation from the context's mean profile.
    tempo_bins: int = 0
    # Each window's tag probabilities beside its embedding, from a frozen copy of the
    # tagger's head: what the tagger hears in that window (its drums, for a breakdown)
    # reaches the transformer as it is, not only through the embedding's directions.
    window_probs: bool = False
    # A tempo change as the context's largest split of the tempo profile (split_score): its
    # track logits gain a learned multiple of it. A fixed rule on that score finds the
    # synthetic test songs' tempo changes at song ROC-AUC 0.999 (docs/experiment.md).
    tempo_split: bool = False

    def __post_init__(self) -> None:
        check_profile_bins(self.chroma_bins, self.tempo_bins)
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model {self.d_model} is not divisible by n_heads "
                              f"{self.n_heads}")


AGGREGATOR_SIZES: dict[str, dict] = {
    "large": {"d_model": 128, "n_layers": 2, "n_heads": 4},
    "small": {"d_model": 128, "n_layers": 2, "n_heads": 4},
    "tiny": {"d_model": 64, "n_layers": 1, "n_heads": 4, "ff_mult": 2},
    "debug": {"d_model": 32, "n_layers": 1, "n_heads": 2, "ff_mult": 2, "max_windows": 16},
}


def aggregator_config(size: str, n_tags: int, d_in: int, **overrides) -> AggregatorConfig:
    return AggregatorConfig(n_tags=n_tags, d_in=d_in,
                            **{**named_size(size, AGGREGATOR_SIZES), **overrides})


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
        d_emb = cfg.d_in - cfg.chroma_bins - cfg.tempo_bins
        d_window = d_emb + 2 * cfg.tempo_bins
        if cfg.chroma_bins:
            k = cfg.tonal_templates
            # Learned key profiles, scored at all 12 transpositions of a chroma profile; the
            # best transposition's score is what the window (or the context) sounds like,
            # whatever its key.
            self.templates = nn.Parameter(torch.randn(k, CHROMA_BINS) * 0.1)
            rot = (torch.arange(CHROMA_BINS)[None, :] + torch.arange(CHROMA_BINS)[:, None])
            self.register_buffer("rotations", rot % CHROMA_BINS, persistent=False)
            self.tonal_head = nn.Linear(k, cfg.n_tags)
            nn.init.zeros_(self.tonal_head.weight)
            nn.init.zeros_(self.tonal_head.bias)
            d_window += CHROMA_BINS + k
        if cfg.tempo_split:
            if not cfg.tempo_bins:
                raise ConfigError("tempo_split needs a tagger with a tempo profile (tempo_bins)")
            self.split_head = nn.Linear(1, cfg.n_tags)
            nn.init.zeros_(self.split_head.weight)
            nn.init.zeros_(self.split_head.bias)
        if cfg.window_probs:
            self.window_head = nn.Linear(d_emb, cfg.n_tags)  # the tagger's: load_window_head
            self.window_head.requires_grad_(False)
            d_window += cfg.n_tags
        self.inp = nn.Sequential(nn.LayerNorm(d_window), nn.Linear(d_window, cfg.d_model))
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
            self.skip = nn.Linear(d_emb, cfg.n_tags)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, emb: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = emb.shape
        if t > self.cfg.max_windows:
            raise ConfigError(f"{t} windows exceed the aggregator context "
                              f"({self.cfg.max_windows})")
        w = (emb.new_ones(b, t, 1) if valid is None else valid.to(emb.dtype).unsqueeze(-1))
        e, window, tonal_out = self.window_inputs(emb, w)
        _, _, tempo = self._parts(emb)
        x = self.inp(window)
        x = torch.cat([self.cls.expand(b, -1, -1), x], dim=1) + self.pos[:, : t + 1]
        pad = None
        if valid is not None:
            pad = torch.cat([valid.new_zeros(b, 1), ~valid], dim=1)  # CLS is never padded
        for blk in self.blocks:
            x = blk(x, pad)
        out = self.head(self.norm(x[:, 0]))
        if tonal_out is not None:
            out = out + tonal_out
        if self.cfg.tempo_split:
            out = out + self.split_head(SPLIT_GAIN * split_score(tempo, w))
        if self.cfg.mean_skip:
            out = out + self.skip(_masked_mean(e, w))
        return out

    def window_inputs(self, emb: torch.Tensor, w: torch.Tensor):
        """``(batch, windows, d_in)`` and weights ``(batch, windows, 1)`` -> the CLS
        embeddings, each window's input to the transformer and the tonal logits (or None)."""
        e, chroma, tempo = self._parts(emb)
        window, tonal_out = e, None
        if chroma is not None:
            window, tonal_out = self._with_tonal(e, chroma, w)
        if tempo is not None:
            # Each window's tempo profile and how it differs from the context's: a tempo
            # change is a deviation that flips sign part-way through.
            window = torch.cat([window, tempo, tempo - _masked_mean(tempo, w)[:, None]], dim=-1)
        if self.cfg.window_probs:
            window = torch.cat([window, torch.sigmoid(self.window_head(e))], dim=-1)
        return e, window, tonal_out

    def _parts(self, emb: torch.Tensor):
        """The tagger's embedding output split into its CLS embeddings, chroma profiles and
        tempo profiles (None for a profile the config has not)."""
        d_emb = self.cfg.d_in - self.cfg.chroma_bins - self.cfg.tempo_bins
        d_chroma = d_emb + self.cfg.chroma_bins
        return (emb[..., :d_emb],
                emb[..., d_emb:d_chroma] if self.cfg.chroma_bins else None,
                emb[..., d_chroma:] if self.cfg.tempo_bins else None)

    def load_window_head(self, head: nn.Linear) -> None:
        """Copy the tagger's output layer: the window probabilities of ``window_probs``."""
        self.window_head.load_state_dict(head.state_dict())

    def _template_scores(self, chroma: torch.Tensor) -> torch.Tensor:
        """``(..., 12)`` profiles -> ``(..., templates)``: each template's best transposition.

        Profiles are centred and scaled (sum 1 -> deviations from the flat profile in units
        of its level) so that scores are of order one.
        """
        centred = CHROMA_BINS * chroma - 1.0
        rolled = centred[..., self.rotations]  # (..., 12 transpositions, 12)
        return torch.matmul(rolled, self.templates.t()).amax(dim=-2)

    def _with_tonal(self, e: torch.Tensor, chroma: torch.Tensor, w: torch.Tensor):
        """Window inputs with transposition-invariant tonal features, and the context's
        tonal logits.

        Per window: its chroma rotated so that the context's strongest pitch class comes
        first (a key change shows as a shifted profile, the song's key does not matter) and
        its template scores. Per context: the template scores of the mean profile.
        """
        mean = _masked_mean(chroma, w)  # (B, 12)
        idx = self.rotations[mean.argmax(dim=-1)]  # (B, 12): from the strongest class on
        relative = torch.gather(chroma, 2, idx[:, None, :].expand(-1, chroma.shape[1], -1))
        window = torch.cat([e, relative, self._template_scores(chroma)], dim=-1)
        return window, self.tonal_head(self._template_scores(mean))


SPLIT_MIN_WINDOWS = 3
SPLIT_MIN_FRACTION = 0.2  # of the context's windows, on each side of a split
# The score is ~0.1-1 and its head starts at zero: Adam moves a weight by about the learning
# rate per step, so without a gain 1,000 steps left it at 0.2 (a logit change under 0.2).
SPLIT_GAIN = 8.0


def split_score(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``(batch, windows, d)`` values and weights ``(batch, windows, 1)`` -> ``(batch, 1)``:
    the largest L1 distance between the mean of the windows before a split of the context
    and the mean of those after it, over splits with at least ``max(3, 20 %)`` of its
    windows on each side (0 where there is none). Padded windows (weight 0) count on
    neither side."""
    cs, cw = torch.cumsum(x * w, dim=1), torch.cumsum(w, dim=1)  # before and at each window
    total, n = cs[:, -1:], cw[:, -1:]
    before = cs / cw.clamp_min(1e-6)
    after = (total - cs) / (n - cw).clamp_min(1e-6)
    dist = (before - after).abs().sum(dim=-1, keepdim=True)  # (B, T, 1)
    k = torch.clamp(torch.ceil(SPLIT_MIN_FRACTION * n), min=SPLIT_MIN_WINDOWS)
    ok = (cw >= k) & (n - cw >= k)
    return torch.where(ok, dist, torch.zeros_like(dist)).amax(dim=1)


def _masked_mean(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``(batch, windows, d)`` averaged over windows with weights ``(batch, windows, 1)``."""
    return (x * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)
