"""What a model costs: multiply-accumulates per window (counted with hooks) and parameters.

``rtagger sizes`` prints :func:`size_report`; the benchmarks and the experiment's tables
read :func:`tagger_cost`.
"""

from __future__ import annotations

import torch
from torch import nn

from rtagger.audio.decode import WINDOW_SAMPLES
from rtagger.model.aggregator import ContextAggregator, aggregator_config
from rtagger.model.features import Chroma, LogMel, Tempo
from rtagger.model.network import SIZES, ChunkTagger, SelfAttention, tagger_config


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

    def chroma_hook(m: Chroma, inp, _out):
        nonlocal total
        b, samples = inp[0].shape
        frames = 1 + samples // m.hop_length
        fft = (m.n_fft // 2) * int(torch.log2(torch.tensor(m.n_fft)).item()) * 4
        total += b * frames * (fft + m.fbank.numel())

    def tempo_hook(m: Tempo, inp, out):
        nonlocal total
        b, _, frames = inp[0].shape
        total += b * (len(m.lags) * frames + m.weights_t.numel())  # lagged products, bins

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
        elif isinstance(mod, Chroma):
            hooks.append(mod.register_forward_hook(chroma_hook))
        elif isinstance(mod, Tempo):
            hooks.append(mod.register_forward_hook(tempo_hook))
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
