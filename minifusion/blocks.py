"""Chapter 11 — block variants: how a sublayer's output joins the residual stream.

A decoder layer has one or two *sublayers* (the mixer, then the FFN), each adding its output
``f`` to the residual stream ``x``. The default is the pre-norm block of GPT-2 and Llama,
``x + f(norm(x))``. Four variants change that one line, each switched on in the config:

* **LayerScale** (Touvron et al., 2021, "Going deeper with Image Transformers", CaiT):
  ``x + γ ⊙ f``, with a learned per-channel gain ``γ`` that starts small
  (``layer_scale_init``; CaiT uses 0.1 up to 18 layers, 1e-5 at 24, 1e-6 deeper), so each
  sublayer starts close to the identity and grows in as training finds it useful.
* **DropPath** — stochastic depth (Huang et al., 2016): while training, each *sample* skips a
  sublayer with probability ``p`` (its ``f`` is zeroed) and the kept ones are scaled by
  ``1/(1−p)`` so the expected output is unchanged; at inference every sublayer runs. ``p`` grows
  linearly with depth, from 0 in layer 0 to ``drop_path_rate`` in the last (the paper's
  "linear decay rule").
* **DeepNorm** (Wang et al., 2022, "DeepNet: Scaling Transformers to 1,000 Layers"): a post-norm
  block ``norm(α·x + f(x))`` whose residual is up-weighted by ``α = (2N)^¼`` and whose
  value/output/FFN weights start smaller, Xavier-normal with gain ``β = (8N)^−¼`` (the paper's
  decoder-only setting, ``N`` layers). Post-norm keeps every layer's output at unit scale; α and β
  bound how far one update can move the model, which is what made 1,000-layer training stable.
* **Parallel residual** (GPT-J; PaLM, Chowdhery et al., 2022): mixer and FFN read the *same*
  normalised input and both add to ``x`` at once, ``x + mix(norm(x)) + ffn(norm(x))``. One norm
  fewer per layer, and on accelerators the two sublayers' input matmuls can be fused.

:class:`Residual` applies the first three to one sublayer; the decoder layer
(:class:`~minifusion.model.MiniFusionDecoderLayer`) arranges the sublayers in sequence or in
parallel.
"""

import math

import torch
from torch import nn

from .config import MiniFusionConfig

__all__ = [
    "DropPath",
    "LayerScale",
    "Residual",
    "deepnorm_coefficients",
    "drop_path_rates",
    "xavier_std",
]


def deepnorm_coefficients(num_layers: int) -> tuple[float, float]:
    """DeepNet's decoder-only ``(α, β) = ((2N)^¼, (8N)^−¼)`` for ``N = num_layers``."""
    if num_layers < 1:
        raise ValueError(f"num_layers={num_layers} must be ≥ 1.")
    return (2 * num_layers) ** 0.25, (8 * num_layers) ** -0.25


def drop_path_rates(rate: float, num_layers: int) -> list[float]:
    """Per-layer DropPath probabilities: ``rate · i / (N − 1)``, 0 in the first layer."""
    if num_layers == 1:
        return [float(rate)]
    return [rate * i / (num_layers - 1) for i in range(num_layers)]


class LayerScale(nn.Module):
    """``x ⊙ γ`` with a learned per-channel ``γ`` ``(H,)`` started at ``init``."""

    def __init__(self, hidden_size: int, init: float):
        super().__init__()
        self.init = float(init)
        self.gamma = nn.Parameter(torch.full((hidden_size,), self.init))

    def reset(self) -> None:
        with torch.no_grad():
            self.gamma.fill_(self.init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.gamma.shape[0]}, init={self.init:g}"


class DropPath(nn.Module):
    """Zero a whole sample's branch ``(B, …)`` with probability ``p`` while training; scale the
    kept ones by ``1/(1−p)``. The identity in eval mode (and for ``p = 0``)."""

    def __init__(self, p: float):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"DropPath probability p={p} must be in [0, 1).")
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = 1.0 - self.p
        # one draw per sample, broadcast over time and channels
        mask = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device, dtype=x.dtype)
        return x * mask.bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p:g}"


class Residual(nn.Module):
    """Adds one sublayer's output ``f`` ``(B, T, H)`` to the residual stream ``x``.

    ``x + DropPath(LayerScale(Dropout(f)))`` — or, for a DeepNorm layer,
    ``post_norm(α·x + DropPath(LayerScale(Dropout(f))))`` with the layer's norm passed in.
    Each piece is the identity when its setting is off, so the default is ``x + f``.
    """

    def __init__(self, config: MiniFusionConfig, layer_idx: int):
        super().__init__()
        p = config.hidden_dropout
        # dropout on what the sublayer adds (off by default, as in most pretraining)
        self.dropout = nn.Dropout(p) if p > 0 else nn.Identity()
        self.layer_scale = None
        if config.layer_scale_init is not None:
            self.layer_scale = LayerScale(config.hidden_size, config.layer_scale_init)
        rate = drop_path_rates(config.drop_path_rate, config.num_hidden_layers)[layer_idx]
        self.drop_path = DropPath(rate) if rate > 0 else nn.Identity()
        self.alpha = deepnorm_coefficients(config.num_hidden_layers)[0] if config.deepnorm else 1.0

    def forward(
        self, x: torch.Tensor, branch: torch.Tensor, post_norm: nn.Module | None = None
    ) -> torch.Tensor:
        branch = self.dropout(branch)
        if self.layer_scale is not None:
            branch = self.layer_scale(branch)
        branch = self.drop_path(branch)
        if post_norm is None:
            return x + branch
        return post_norm(self.alpha * x + branch)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:.4g}" if self.alpha != 1.0 else ""


def xavier_std(fan_in: int, fan_out: int, gain: float = 1.0) -> float:
    """Xavier-normal's standard deviation, ``gain·√(2/(fan_in + fan_out))`` (DeepNet's init)."""
    return gain * math.sqrt(2.0 / (fan_in + fan_out))
