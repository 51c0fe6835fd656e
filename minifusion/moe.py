"""Chapter 08 — Mixture-of-Experts: a router sends each token to a few specialist SwiGLUs.

A dense FFN asks every token to pass through the same big network. A Mixture-of-Experts layer
(Shazeer et al., 2017; Switch Transformer, Fedus et al., 2021; Mixtral, Jiang et al., 2024) keeps
``num_experts`` smaller SwiGLUs and a *router* that scores them for each token; only the
``top_k`` best-scoring experts run, and their outputs are mixed with the router's weights. The
model holds many parameters but each token pays for only ``top_k`` experts.

Pieces, in the order a token meets them:

* **Router** — a bias-free linear ``gate`` ``H → E``; softmax (or sigmoid) scores; top-k; the kept
  weights optionally renormalised to sum to 1.
* **Aux-loss-free balancing** (DeepSeek-V3; Wang et al., 2024) — a per-expert ``expert_bias`` added
  to the scores *only to choose* experts (the mixing weights ignore it), nudged after each step
  toward under-used experts by :meth:`MoE.update_expert_bias`, outside backpropagation.
* **Shared experts** (DeepSeekMoE, Dai et al., 2024) — ``num_shared_experts`` SwiGLUs every token
  always uses, so common knowledge need not be copied into every routed expert.
* **Dropless dispatch** — assignments are grouped by expert, each expert runs one matmul over its
  tokens, and results are scattered back weighted. Every expert runs, even on zero tokens, so all
  parameters take part in the graph (zero gradients, no data-parallel hangs). An optional
  ``capacity_factor`` caps each expert at ``ceil(factor · tokens · k / E)`` assignments and
  counts what is dropped.
* **Losses** — the Switch/Mixtral load-balancing loss ``E · Σᵢ fᵢ · Pᵢ`` (``fᵢ``: share of
  assignments to expert ``i``, summing to ``k``; ``Pᵢ``: its mean router probability; a perfectly
  balanced router scores ``k``), over all tokens or per sequence; and the router z-loss
  ``mean(logsumexp(logits)²)`` (ST-MoE, Zoph et al., 2022).
"""

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import MiniFusionConfig
from .mlp import SwiGLU

__all__ = ["MoE", "MoEOutput", "Router", "RouterOutput", "load_balancing_loss", "router_z_loss"]


@dataclass
class RouterOutput:
    logits: torch.Tensor  # (N, E) fp32
    probs: torch.Tensor  # (N, E) fp32: softmax (or normalised sigmoid) of the logits
    expert_index: torch.Tensor  # (N, k) the chosen experts
    expert_weight: torch.Tensor  # (N, k) fp32 mixing weights


@dataclass
class MoEOutput:
    hidden_states: torch.Tensor  # (B, T, H)
    balance_loss: torch.Tensor  # scalar, raw (balanced = top_k)
    z_loss: torch.Tensor  # scalar, raw
    aux_loss: torch.Tensor  # moe_aux_loss_coef · balance + moe_router_z_loss_coef · z
    router_logits: torch.Tensor  # (B·T, E)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # detached, for logging


def load_balancing_loss(
    probs: torch.Tensor,
    expert_index: torch.Tensor,
    num_experts: int,
    per_sequence: int | None = None,
) -> torch.Tensor:
    """``E · Σᵢ fᵢ · Pᵢ`` for ``probs`` ``(N, E)`` and chosen ``expert_index`` ``(N, k)``.

    ``fᵢ`` is the number of assignments to expert ``i`` divided by ``N`` (so ``Σ fᵢ = k``) and
    ``Pᵢ`` the mean probability of expert ``i``. With ``per_sequence=T`` the ``N = B·T`` rows are
    split into sequences, the loss is computed for each and averaged (a sequence-level balance).
    """
    if per_sequence is not None:
        batch = probs.shape[0] // per_sequence
        probs = probs.view(batch, per_sequence, num_experts)
        expert_index = expert_index.view(batch, per_sequence, -1)
    else:
        probs, expert_index = probs[None], expert_index[None]
    counts = torch.zeros(probs.shape[0], num_experts, device=probs.device, dtype=torch.float32)
    counts.scatter_add_(
        1,
        expert_index.flatten(1),
        torch.ones(expert_index.flatten(1).shape, device=probs.device, dtype=torch.float32),
    )
    fraction = counts / probs.shape[1]  # (S, E): assignments per token, sums to k
    mean_prob = probs.float().mean(dim=1)  # (S, E)
    return num_experts * (fraction * mean_prob).sum(dim=-1).mean()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """``mean(logsumexp(logits)²)``: keeps router logits small, so the softmax stays stable."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


class Router(nn.Module):
    """Scores ``E`` experts for each of ``N`` tokens ``(N, H)`` and picks the top ``k``."""

    def __init__(self, config: MiniFusionConfig):
        super().__init__()
        self.num_experts = config.moe_num_experts
        self.top_k = config.moe_top_k
        self.scoring = config.moe_router_scoring
        self.normalize = config.moe_norm_topk_prob
        self.use_bias = config.moe_aux_loss_free_bias
        self.gate = nn.Linear(config.hidden_size, self.num_experts, bias=False)
        # Not a parameter: changed by update rules, not by gradients; saved with the model.
        self.register_buffer("expert_bias", torch.zeros(self.num_experts))

    def forward(self, hidden_states: torch.Tensor) -> RouterOutput:
        logits = self.gate(hidden_states).float()
        if self.scoring == "softmax":
            scores = torch.softmax(logits, dim=-1)
            probs = scores
        else:  # sigmoid: independent scores; normalised only for the balance statistics
            scores = torch.sigmoid(logits)
            probs = scores / scores.sum(dim=-1, keepdim=True)
        choice = scores + self.expert_bias if self.use_bias else scores
        _, expert_index = torch.topk(choice, self.top_k, dim=-1)
        expert_weight = scores.gather(-1, expert_index)  # the bias never enters the weights
        if self.normalize:
            expert_weight = expert_weight / expert_weight.sum(dim=-1, keepdim=True)
        return RouterOutput(logits, probs, expert_index, expert_weight)


class MoE(nn.Module):
    """``(B, T, H)`` → :class:`MoEOutput` whose ``hidden_states`` is ``(B, T, H)``.

    Expert ``i`` is ``experts.{i}`` (a :class:`~minifusion.mlp.SwiGLU` of width
    ``moe_intermediate_size``); shared experts are ``shared_experts.{j}``; the router's linear
    layer is ``router.gate``.
    """

    def __init__(self, config: MiniFusionConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_experts = config.moe_num_experts
        self.top_k = config.moe_top_k
        self.capacity_factor = config.moe_capacity_factor
        self.balance_coef = config.moe_aux_loss_coef
        self.z_coef = config.moe_router_z_loss_coef
        self.sequence_balance = config.moe_balance_loss == "sequence"
        self.bias_update_rate = config.moe_bias_update_rate
        self.router = Router(config)
        width = config.moe_intermediate_size
        self.experts = nn.ModuleList(SwiGLU(config, width) for _ in range(self.num_experts))
        self.shared_experts = nn.ModuleList(
            SwiGLU(config, width) for _ in range(config.moe_num_shared_experts)
        )
        # Assignments counted since the last bias update (aux-loss-free balancing).
        self.register_buffer("load_since_update", torch.zeros(self.num_experts), persistent=False)

    def forward(self, hidden_states: torch.Tensor) -> MoEOutput:
        batch, length, hidden = hidden_states.shape
        tokens = hidden_states.reshape(-1, hidden)
        route = self.router(tokens)
        output, load = self._dispatch(tokens, route.expert_index, route.expert_weight)
        for expert in self.shared_experts:
            output = output + expert(tokens)

        balance = load_balancing_loss(
            route.probs,
            route.expert_index,
            self.num_experts,
            per_sequence=length if self.sequence_balance else None,
        )
        z_loss = router_z_loss(route.logits)
        if self.training:
            self.load_since_update += load
        entropy = -(route.probs * route.probs.clamp_min(1e-12).log()).sum(-1).mean()
        stats = {
            "tokens_per_expert": load.detach(),
            "router_entropy": entropy.detach(),
            "dropped_fraction": 1.0 - load.sum() / route.expert_index.numel(),
        }
        return MoEOutput(
            hidden_states=output.view(batch, length, hidden),
            balance_loss=balance,
            z_loss=z_loss,
            aux_loss=self.balance_coef * balance + self.z_coef * z_loss,
            router_logits=route.logits,
            stats=stats,
        )

    def _dispatch(
        self, tokens: torch.Tensor, expert_index: torch.Tensor, expert_weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Group the ``N·k`` assignments by expert, run each expert once, scatter back.

        Returns the ``(N, H)`` routed output and the ``(E,)`` number of assignments each expert
        served (fewer than it was sent only when a capacity factor drops some).
        """
        num_tokens, k = expert_index.shape
        flat_expert = expert_index.reshape(-1)
        # A stable sort keeps tokens in sequence order within each expert, so a capacity limit
        # drops the latest tokens, not random ones.
        order = torch.argsort(flat_expert, stable=True)
        counts = torch.bincount(flat_expert, minlength=self.num_experts).tolist()
        capacity = num_tokens * k  # dropless: no expert can be sent more than every assignment
        if self.capacity_factor is not None:
            capacity = math.ceil(self.capacity_factor * num_tokens * k / self.num_experts)

        output = torch.zeros_like(tokens)
        served = [min(count, capacity) for count in counts]
        start = 0
        for expert_id, count in enumerate(counts):
            assignments = order[start : start + served[expert_id]]
            start += count
            token_ids = assignments // k
            # Runs even with zero tokens: the expert stays in the graph and gets zero gradients.
            expert_out = self.experts[expert_id](tokens[token_ids])
            weight = expert_weight.reshape(-1)[assignments, None]
            output.index_add_(0, token_ids, (expert_out * weight).to(output.dtype))
        return output, torch.tensor(served, dtype=torch.float32, device=tokens.device)

    @torch.no_grad()
    def update_expert_bias(self) -> torch.Tensor:
        """Aux-loss-free balancing step: raise the bias of under-loaded experts, lower the others.

        ``b_i += rate · sign(mean load − load_i)`` over the assignments counted since the last
        call (summed across processes when running distributed). Call it after each optimiser
        step. Returns the load it used.
        """
        load = self.load_since_update.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load)
        self.router.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)
        self.load_since_update.zero_()
        return load


def moe_from_mixtral_state(mixtral_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map transformers' ``MixtralSparseMoeBlock`` weights onto :class:`MoE` names.

    Mixtral stores the experts as 3-D tensors: ``experts.gate_up_proj`` ``(E, 2I, H)`` (gate rows
    first, then up) and ``experts.down_proj`` ``(E, H, I)``; its router weight is
    ``gate.weight``.
    """
    gate_up, down = mixtral_state["experts.gate_up_proj"], mixtral_state["experts.down_proj"]
    width = gate_up.shape[1] // 2
    state = {"router.gate.weight": mixtral_state["gate.weight"]}
    for expert in range(gate_up.shape[0]):
        state[f"experts.{expert}.gate_proj.weight"] = gate_up[expert, :width]
        state[f"experts.{expert}.up_proj.weight"] = gate_up[expert, width:]
        state[f"experts.{expert}.down_proj.weight"] = down[expert]
    return state
