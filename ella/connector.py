"""The Timestep-Aware Semantic Connector (TSC) of ELLA, in the released checkpoint's key layout.

Math (arXiv 2403.05135): a sinusoidal embedding of the DDPM timestep drives adaptive layer norms
in a perceiver resampler whose learned latents attend to projected T5 features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .devices import compute_device


@dataclass(frozen=True)
class ConnectorConfig:
    """Sizes of a connector; `from_shapes` reads them off a state dict."""

    width: int = 768
    num_latents: int = 64
    num_blocks: int = 6
    input_dim: int = 2048
    time_channels: int = 320
    time_embed_dim: int = 768
    output_dim: int | None = None
    heads: int = 8

    @property
    def out_width(self) -> int:
        """Width of each output token."""
        return self.output_dim or self.width


class TimestepEmbedding(nn.Module):
    """Sinusoidal features (cos first, no frequency shift) followed by Linear-SiLU-Linear."""

    def __init__(self, channels: int, embed_dim: int) -> None:
        super().__init__()
        self.register_buffer("frequencies", sinusoid_frequencies(channels), persistent=False)
        self.linear_1 = nn.Linear(channels, embed_dim)
        self.linear_2 = nn.Linear(embed_dim, embed_dim)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        """timesteps [B] (DDPM index, float) -> [B, embed_dim]."""
        angles = timesteps.float()[:, None] * self.frequencies.float()[None]
        features = torch.cat([angles.cos(), angles.sin()], dim=-1).to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(features)))


def sinusoid_frequencies(channels: int, device: str | torch.device | None = None) -> torch.Tensor:
    """The channels // 2 frequencies of the sinusoidal timestep features (downscale_freq_shift 0)."""
    half = channels // 2
    return torch.exp(-math.log(10000.0) * torch.arange(half, device=device, dtype=torch.float32) / half)


class AdaLayerNorm(nn.Module):
    """LayerNorm without affine (eps 1e-6) scaled and shifted by a projection of the timestep embedding."""

    def __init__(self, width: int, time_embed_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(time_embed_dim, 2 * width)

    def forward(self, x: torch.Tensor, time_act: torch.Tensor) -> torch.Tensor:
        """x [B, N, W]; time_act = SiLU(timestep embedding) [B, T]."""
        shift, scale = self.linear(time_act)[:, None].chunk(2, dim=-1)
        return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale) + shift


class Attention(nn.Module):
    """Multi-head attention with packed q/k/v weights, as torch.nn.MultiheadAttention stores them."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, q: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """q [B, Nq, W], kv [B, Nk, W]; bias: additive logits [B, 1, 1, Nk] or None."""
        w_q, w_kv = self.in_proj_weight.split([q.shape[-1], 2 * q.shape[-1]])
        b_q, b_kv = self.in_proj_bias.split([q.shape[-1], 2 * q.shape[-1]])
        query = self._split_heads(F.linear(q, w_q, b_q))
        key, value = (self._split_heads(t) for t in F.linear(kv, w_kv, b_kv).chunk(2, dim=-1))
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias)
        return self.out_proj(out.transpose(1, 2).flatten(2))

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)


class SquaredReLUMLP(nn.Module):
    """Linear(4x) -> ReLU(x)^2 -> Linear."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(torch.relu(self.c_fc(x)).square())


class PerceiverBlock(nn.Module):
    """Latents attend to themselves and to the text tokens, then pass an MLP; both steps residual."""

    def __init__(self, width: int, heads: int, time_embed_dim: int) -> None:
        super().__init__()
        self.attn = Attention(width, heads)
        self.ln_1 = AdaLayerNorm(width, time_embed_dim)
        self.ln_2 = AdaLayerNorm(width, time_embed_dim)
        self.ln_ff = AdaLayerNorm(width, time_embed_dim)
        self.mlp = SquaredReLUMLP(width)

    def forward(self, x: torch.Tensor, latents: torch.Tensor, time_act: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        normed = self.ln_1(latents, time_act)
        latents = latents + self.attn(normed, torch.cat([normed, self.ln_2(x, time_act)], dim=1), bias)
        return latents + self.mlp(self.ln_ff(latents, time_act))


class PerceiverResampler(nn.Module):
    """Learned, timestep-shifted latents that read the projected T5 features through perceiver blocks."""

    def __init__(self, cfg: ConnectorConfig) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.empty(cfg.num_latents, cfg.width))
        self.time_aware_linear = nn.Linear(cfg.time_embed_dim, cfg.width)
        self.proj_in = nn.Linear(cfg.input_dim, cfg.width)
        self.perceiver_blocks = nn.ModuleList(
            PerceiverBlock(cfg.width, cfg.heads, cfg.time_embed_dim) for _ in range(cfg.num_blocks)
        )
        self.proj_out = (
            nn.Sequential(nn.Linear(cfg.width, cfg.output_dim), nn.LayerNorm(cfg.output_dim))
            if cfg.output_dim else None
        )

    def forward(self, features: torch.Tensor, time_emb: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        time_act = F.silu(time_emb)
        latents = self.latents[None] + self.time_aware_linear(time_act)[:, None]
        x = self.proj_in(features)
        for block in self.perceiver_blocks:
            latents = block(x, latents, time_act, bias)
        return latents if self.proj_out is None else self.proj_out(latents)


class Connector(nn.Module):
    """ELLA's TSC: `connector(features, timesteps, mask=None)` -> [B, num_latents, width]."""

    def __init__(self, cfg: ConnectorConfig) -> None:
        super().__init__()
        self.config = cfg
        self.time_embedding = TimestepEmbedding(cfg.time_channels, cfg.time_embed_dim)
        self.connector = PerceiverResampler(cfg)

    @property
    def device(self) -> torch.device:
        """Where the weights are (the one answer for the connector and the rows it makes)."""
        return self.connector.latents.device

    @device.setter
    def device(self, value: torch.device) -> None:
        """ComfyUI's ModelPatcher records its placement in `module.device`; the weights already say it."""

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the weights are stored and computed in."""
        return self.connector.latents.dtype

    def forward(self, features: torch.Tensor, timesteps: torch.Tensor | float,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """features [B, L, input_dim]; timesteps: scalar or [B] (0..999 DDPM index);
        mask [B, L], True/1 = real token. Without a mask every token is attended, as in the reference."""
        batch, length = features.shape[:2]
        device, dtype = compute_device(self.connector, self.connector.latents), self.dtype
        features = features.to(device, dtype)
        t = torch.as_tensor(timesteps, device=device, dtype=torch.float32).reshape(-1).expand(batch)
        bias = None if mask is None else token_bias(mask.to(device), self.config.num_latents, dtype)
        return self.connector(features, self.time_embedding(t), bias)


def token_bias(mask: torch.Tensor, num_latents: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention logits [B, 1, 1, num_latents + L]: 0 for latents and real tokens, -inf for padding.

    A float mask is read as per-token weights w >= 0 and becomes log(w) (w = 0 masks the token)."""
    weights = mask.to(torch.float32)
    logits = torch.where(weights > 0, weights.log(), torch.full_like(weights, -math.inf))
    latents = torch.zeros(mask.shape[0], num_latents, device=mask.device)
    return torch.cat([latents, logits], dim=1)[:, None, None].to(dtype)
