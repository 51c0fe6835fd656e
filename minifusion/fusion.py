"""Chapter 10 — fusing the Mamba and attention branches of a hybrid layer with a learned gate.

A hybrid layer runs two specialists on the same normalised input, side by side: the Mamba
branch (chapter 09) carries a compressed running summary of everything so far; the attention
branch (chapter 06) looks up exact tokens in its window and, for its global heads, anywhere.
:class:`GatedFusion` mixes their outputs ``m`` and ``a`` (both ``(B, T, H)``) channel by
channel::

    g = gate(m, a)                 ∈ (0, 1), per channel (or one number per layer)
    out = fusion_proj(g · m + (1 − g) · a)

Gates (``config.fusion_gate``):

* ``"lowrank"`` — ``g = σ(W_down · tanh(W_up · [m; a]) + b)``: a per-token, per-channel gate from
  both branch outputs through a bottleneck of ``fusion_gate_rank`` (``2H·r + r·H + H`` weights).
* ``"scalar"`` — one learnable number per layer, ``g = σ(s)``.
* ``"average"`` — ``g = ½``, nothing to learn.

With ``fusion_branch_norm`` each branch output first goes through its own RMSNorm: the two
branches produce outputs of different scales (more so in deeper layers), and an unnormalised
gate would mostly learn to undo that scale difference. (Right after initialisation the branch
outputs are so small — mean squares near ``rms_norm_eps`` — that the norms equalise them only
partly; chapter 10 measures this.)

**Regularisers** (:meth:`GatedFusion.regularisers`). A gate that saturates early (``g`` → 0 or 1)
silences one branch, whose gradient then vanishes, so it never recovers. Two terms counter it:
a *balance* term ``coef_b · (mean(g) − target)²`` pulls the average gate toward a target, and an
*entropy* term ``−coef_e · mean(H(g))`` (``H`` the binary entropy) rewards gates that keep
their options open. Both send gradient into the gate's parameters.

**Pruned layers** (chapter 15). A hybrid layer whose gate sits near 0 or 1 can lose its quieter
branch: ``GatedFusion(config, i, keep="attention")`` (or ``"mamba"``) holds only that branch's
norm and ``fusion_proj`` and computes ``fusion_proj(norm(branch))`` — exactly the full layer with
the gate fixed at 0 (attention) or 1 (Mamba). :attr:`GatedFusion.forced_gate` fixes the gate of a
full layer to a number, which is how a pruning decision is measured before weights are removed.

**Statistics**: every forward pass writes the gate's mean, standard deviation and per-channel
mean into buffers, in place and without gradient — no ``.item()``, so neither autograd nor
``torch.compile`` is disturbed. Chapter 15 collects them for monitoring and pruning.
"""

import torch
from torch import nn

from .config import MiniFusionConfig
from .norm import RMSNorm

__all__ = ["GatedFusion", "binary_entropy"]


def binary_entropy(g: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``H(g) = −g·log g − (1−g)·log(1−g)`` in nats, elementwise (``log 2`` at ``g = ½``)."""
    g = g.clamp(eps, 1 - eps)
    return -(g * g.log() + (1 - g) * (1 - g).log())


def _recomputing_in_backward() -> bool:
    """Whether this forward runs inside a backward pass: activation checkpointing (whole layers,
    reentrant or not, or DeepSpeed's) recomputes a layer there to rebuild the activations it did
    not keep. Such a pass must not replace :attr:`GatedFusion.last_gate`: the recomputed gate's
    autograd graph holds every activation recomputed upstream of it (both branches), which would
    then stay allocated until the next forward — 470 MiB after each step of ``small`` at
    2 × 512 tokens. (``torch.utils.checkpoint`` tells the two passes apart the same way.)"""
    if torch.compiler.is_compiling():
        return False  # a compiled model recomputes inside its compiled backward, not through here
    return torch._C._current_graph_task_id() != -1


class GatedFusion(nn.Module):
    """Fuse ``mamba_out`` and ``attn_out`` ``(B, T, H)`` into one ``(B, T, H)`` output.

    Parameters (names as in ``config.layer_parameter_breakdown``): ``gate_up`` ``(r, 2H)`` and
    ``gate_down`` ``(H, r)`` with bias (``lowrank``), or ``gate_logit`` ``()`` (``scalar``);
    ``mamba_norm`` and ``attn_norm`` (``fusion_branch_norm``); ``fusion_proj`` ``(H, H)``.
    After each forward pass, :attr:`last_gate` holds the gate (with gradient) for the
    regularisers, and the buffers ``gate_mean``, ``gate_std`` and ``gate_channel_mean`` its
    statistics (activation checkpointing's second pass, in backward, leaves both alone). While
    decoding with a cache the statistics are skipped (a few small operations per token that
    nobody reads there) unless :attr:`record_while_decoding` is set.

    ``keep="attention"`` or ``"mamba"`` builds the fusion of a pruned layer: no gate, only the kept
    branch's norm and ``fusion_proj``; ``forward`` then takes ``None`` for the removed branch.
    """

    def __init__(self, config: MiniFusionConfig, layer_idx: int = 0, keep: str | None = None):
        super().__init__()
        if keep not in (None, "attention", "mamba"):
            raise ValueError(f"keep={keep!r}: expected None, 'attention' or 'mamba'.")
        self.layer_idx = layer_idx
        self.keep = keep
        self.kind = config.fusion_gate if keep is None else "pruned"
        # A number in [0, 1] fixes the gate (1 = all Mamba); None lets it compute (chapter 15).
        self.forced_gate: float | None = None
        self.record_while_decoding = False
        hidden, rank = config.hidden_size, config.fusion_gate_rank
        if self.kind == "lowrank":
            self.gate_up = nn.Linear(2 * hidden, rank, bias=False)
            self.gate_down = nn.Linear(rank, hidden, bias=True)
            # g ≈ ½ at the start (no branch favoured) once the model's init draws the gate
            # weights from N(0, 0.02²); a GatedFusion built on its own keeps PyTorch's init
            nn.init.zeros_(self.gate_down.bias)
        elif self.kind == "scalar":
            self.gate_logit = nn.Parameter(torch.zeros(()))
        self.mamba_norm = self.attn_norm = None
        if config.fusion_branch_norm:
            if keep != "attention":
                self.mamba_norm = RMSNorm(hidden, eps=config.rms_norm_eps)
            if keep != "mamba":
                self.attn_norm = RMSNorm(hidden, eps=config.rms_norm_eps)
        self.fusion_proj = nn.Linear(hidden, hidden, bias=False)
        self.balance_coef = float(config.gate_balance_coef)
        self.balance_target = float(config.gate_balance_target)
        self.entropy_coef = float(config.gate_entropy_coef)
        self.register_buffer("gate_mean", torch.full((), 0.5), persistent=False)
        self.register_buffer("gate_std", torch.zeros(()), persistent=False)
        self.register_buffer("gate_channel_mean", torch.full((hidden,), 0.5), persistent=False)
        self.last_gate: torch.Tensor | None = None

    def gate(self, mamba_out: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """``g`` in ``(0, 1)``: ``(B, T, H)`` for ``lowrank``, a 0-d tensor otherwise."""
        if self.forced_gate is not None:
            return mamba_out.new_tensor(float(self.forced_gate))
        if self.kind == "lowrank":
            bottleneck = torch.tanh(self.gate_up(torch.cat((mamba_out, attn_out), dim=-1)))
            return torch.sigmoid(self.gate_down(bottleneck))
        if self.kind == "scalar":
            return torch.sigmoid(self.gate_logit)
        return mamba_out.new_tensor(0.5)

    def forward(
        self,
        mamba_out: torch.Tensor | None,
        attn_out: torch.Tensor | None,
        decoding: bool = False,
    ) -> torch.Tensor:
        """``decoding``: called with a cache (generation), where the gate statistics are
        skipped unless :attr:`record_while_decoding`."""
        if self.keep is not None:  # a pruned layer: the kept branch, normed and projected
            kept, norm = (attn_out, self.attn_norm) if self.keep == "attention" else (
                mamba_out, self.mamba_norm)  # fmt: skip
            return self.fusion_proj(norm(kept) if norm is not None else kept)
        if self.mamba_norm is not None:
            mamba_out, attn_out = self.mamba_norm(mamba_out), self.attn_norm(attn_out)
        g = self.gate(mamba_out, attn_out)
        if not _recomputing_in_backward():
            if not decoding or self.record_while_decoding:
                self._record(g, mamba_out.shape[-1])
            self.last_gate = g
        return self.fusion_proj(g * mamba_out + (1 - g) * attn_out)

    @torch.no_grad()
    def _record(self, g: torch.Tensor, hidden: int) -> None:
        g = g.detach().float()
        per_channel = g.reshape(-1, hidden).mean(0) if g.dim() else g.expand(hidden)
        self.gate_mean.copy_(g.mean())
        self.gate_std.copy_(g.std(correction=0) if g.dim() else torch.zeros_like(g))
        self.gate_channel_mean.copy_(per_channel)

    def regularisers(self) -> dict[str, torch.Tensor]:
        """``{"gate_balance", "gate_entropy"}`` for the last forward pass (0 before any, and for a
        fixed ``average`` gate, which has nothing to learn)."""
        g = self.last_gate
        if g is None or self.kind in ("average", "pruned") or self.forced_gate is not None:
            zero = self.fusion_proj.weight.new_zeros(())
            return {"gate_balance": zero, "gate_entropy": zero}
        balance = self.balance_coef * (g.float().mean() - self.balance_target) ** 2
        entropy = -self.entropy_coef * binary_entropy(g.float()).mean()
        return {"gate_balance": balance, "gate_entropy": entropy}

    def extra_repr(self) -> str:
        if self.keep is not None:
            return f"pruned, keeps {self.keep}"
        return f"gate={self.kind!r}, branch_norm={self.mamba_norm is not None}"
