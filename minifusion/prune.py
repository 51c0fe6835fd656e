"""Chapter 15 — pruning hybrid layers down to the branch they actually use.

A hybrid layer pays for two branches. If its gate (chapter 10) sits near 1 the layer listens
almost only to Mamba; near 0, almost only to attention. Removing the quiet branch then saves its
weights, its compute and — for attention — its share of the KV cache, at little cost in quality.

Three steps, each checkable:

1. **Propose** (:func:`propose_plan`): from the gate statistics of a validation pass
   (:class:`~minifusion.monitor.GateSnapshot`), per hybrid layer: ``"mamba"`` if its mean gate
   is at least ``mamba_above``, ``"attention"`` if at most ``attention_below``, else ``"both"``.
2. **Check** (:func:`check_plan`): every proposed removal is *measured*: the gate of that layer is
   fixed at 1 (keep Mamba) or 0 (keep attention) — exactly what the pruned layer computes — and
   the validation loss compared with the unpruned model's. A removal costing more than
   ``max_loss_increase`` (nats/token) is refused. The accepted removals are then measured
   together; while their joint cost exceeds the budget, the costliest is put back.
3. **Prune** (:func:`prune_model`, :func:`export_pruned`): a new model whose pruned layers are
   ``"attention"`` or ``"mamba"`` layers holding only the kept branch, its branch norm and
   ``fusion_proj`` (``config.pruned_fusion_layers`` lists them); it computes the same function as
   the gate-fixed model, loads with ``from_pretrained`` and generates like any other.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import MiniFusionConfig
from .monitor import GateSnapshot, hybrid_fusions

__all__ = [
    "LayerDecision",
    "PrunePlan",
    "check_plan",
    "export_pruned",
    "forced_gates",
    "propose_plan",
    "prune_model",
    "pruned_config",
]

KEEP_CHOICES = ("both", "attention", "mamba")
# the gate value that keeps one branch: g weighs Mamba, 1 − g attention
_GATE_FOR = {"attention": 0.0, "mamba": 1.0}


def propose_plan(
    snapshot: GateSnapshot, *, mamba_above: float = 0.9, attention_below: float = 0.1
) -> dict[int, str]:
    """``{layer: "both" | "attention" | "mamba"}`` for every hybrid layer of ``snapshot``.

    A layer whose mean gate is ≥ ``mamba_above`` keeps only Mamba, ≤ ``attention_below`` only
    attention; anything between keeps both.
    """
    if not 0.0 <= attention_below < mamba_above <= 1.0:
        raise ValueError(
            f"Thresholds attention_below={attention_below} and mamba_above={mamba_above} must "
            "satisfy 0 ≤ attention_below < mamba_above ≤ 1 (e.g. 0.1 and 0.9)."
        )
    plan = {}
    for layer, mean in zip(snapshot.layers, snapshot.mean.tolist()):
        if mean >= mamba_above:
            plan[layer] = "mamba"
        elif mean <= attention_below:
            plan[layer] = "attention"
        else:
            plan[layer] = "both"
    return plan


@contextmanager
def forced_gates(model: nn.Module, keep: dict[int, str]) -> Iterator[None]:
    """Fix the gates of the layers in ``keep`` (``{layer: "attention" | "mamba"}``) to 0 or 1
    inside the block: the model then computes what the pruned model would."""
    fusions = _hybrid_fusions_named(model, keep)
    try:
        for layer, branch in keep.items():
            if branch != "both":
                fusions[layer].forced_gate = _GATE_FOR[_checked_branch(branch)]
        yield
    finally:
        for layer in keep:
            fusions[layer].forced_gate = None


def _hybrid_fusions_named(model: nn.Module, layers) -> dict:
    """The model's hybrid fusions, after checking that every layer in ``layers`` is one."""
    fusions = hybrid_fusions(model)
    unknown = sorted(set(layers) - set(fusions))
    if unknown:
        raise ValueError(f"The plan names layers {unknown}, which are not hybrid layers "
                         f"(hybrid: {sorted(fusions)}); plan only hybrid layers.")  # fmt: skip
    return fusions


def _checked_branch(branch: str) -> str:
    if branch not in KEEP_CHOICES:
        raise ValueError(f"Unknown choice {branch!r}: use one of {list(KEEP_CHOICES)}.")
    return branch


@dataclass
class LayerDecision:
    """What happens to one hybrid layer, and what measuring it showed."""

    layer: int
    gate_mean: float  # mean gate over the validation tokens (1 = Mamba)
    proposed: str  # from the thresholds
    loss_increase: float | None = None  # validation loss with the removal − without (nats/token)
    decision: str = "both"  # after the measurement
    reason: str = ""


@dataclass
class PrunePlan:
    """The checked plan: one :class:`LayerDecision` per hybrid layer, and the losses measured."""

    decisions: list[LayerDecision]
    baseline_loss: float  # validation loss of the unpruned model (nats/token)
    pruned_loss: float  # with every accepted removal at once
    max_loss_increase: float

    @property
    def keep(self) -> dict[int, str]:
        """``{layer: "attention" | "mamba"}`` for the layers that lose a branch."""
        return {d.layer: d.decision for d in self.decisions if d.decision != "both"}

    def table(self) -> str:
        """A text table of the decisions (for printing)."""
        lines = [
            "layer  gate mean  proposed   Δ val loss  decision   why",
            "-----  ---------  ---------  ----------  ---------  ---",
        ]
        for d in self.decisions:
            delta = "—" if d.loss_increase is None else f"{d.loss_increase:+.4f}"
            lines.append(
                f"{d.layer:>5}  {d.gate_mean:>9.3f}  {d.proposed:<9}  {delta:>10}  "
                f"{d.decision:<9}  {d.reason}"
            )
        lines.append(
            f"validation loss {self.baseline_loss:.4f} → {self.pruned_loss:.4f} "
            f"({self.pruned_loss - self.baseline_loss:+.4f}; budget {self.max_loss_increase:+.4f})"
        )
        return "\n".join(lines)


def check_plan(
    model: nn.Module,
    proposal: dict[int, str],
    validation,
    snapshot: GateSnapshot,
    *,
    max_loss_increase: float = 0.02,
    batch_size: int = 8,
    max_blocks: int | None = None,
    device: torch.device | str | None = None,
) -> PrunePlan:
    """Measure each proposed removal's effect on the validation loss; keep those within budget.

    ``validation``: a :class:`~minifusion.training.ValidationSet`; ``max_blocks`` limits the
    measurement to its first blocks (the same blocks for every measurement, so the differences
    are exact comparisons). Runs ``2 + (number of proposed removals)`` evaluations, or more when
    the joint check has to put removals back.
    """
    from .training import evaluate

    device = torch.device(device or next(model.parameters()).device)
    _hybrid_fusions_named(model, proposal)  # a clear error before any evaluation runs

    def loss_with(keep: dict[int, str]) -> float:
        with forced_gates(model, keep):
            return evaluate(model, validation, batch_size=batch_size, max_blocks=max_blocks,
                            device=device).loss  # fmt: skip

    means = dict(zip(snapshot.layers, snapshot.mean.tolist()))
    baseline = loss_with({})
    decisions = []
    for layer in sorted(proposal):
        choice = _checked_branch(proposal[layer])
        decision = LayerDecision(layer, means[layer], choice)
        if choice == "both":
            decision.reason = "gate between the thresholds"
        else:
            decision.loss_increase = loss_with({layer: choice}) - baseline
            if decision.loss_increase <= max_loss_increase:
                decision.decision, decision.reason = choice, "within budget"
            else:
                decision.reason = "costs more than the budget"
        decisions.append(decision)

    plan = PrunePlan(decisions, baseline, baseline, max_loss_increase)
    while plan.keep:
        plan.pruned_loss = loss_with(plan.keep)
        if plan.pruned_loss - baseline <= max_loss_increase:
            break
        # together they cost too much: put back the removal that cost most on its own
        costliest = max((d for d in decisions if d.decision != "both"),
                        key=lambda d: d.loss_increase)  # fmt: skip
        costliest.decision, costliest.reason = "both", "put back: joint cost over budget"
        plan.pruned_loss = baseline
    return plan


def pruned_config(config: MiniFusionConfig, keep: dict[int, str]) -> MiniFusionConfig:
    """``config`` with the layers in ``keep`` turned into single-branch (pruned) layers."""
    mixer_types = list(config.mixer_types)
    pruned = set(config.pruned_fusion_layers)
    for layer, branch in keep.items():
        if _checked_branch(branch) == "both":
            continue
        if mixer_types[layer] != "hybrid":
            raise ValueError(
                f"Layer {layer} is a {mixer_types[layer]!r} layer; only hybrid layers can be pruned."
            )
        mixer_types[layer] = branch
        pruned.add(layer)
    global_layers = config.global_attention_layers
    if global_layers is not None:  # a layer pruned to Mamba has no heads left to be global
        global_layers = [i for i in global_layers if mixer_types[i] != "mamba"]
    return config.replaced(mixer_types=mixer_types, pruned_fusion_layers=sorted(pruned),
                           global_attention_layers=global_layers)  # fmt: skip


def prune_model(model: nn.Module, keep: dict[int, str] | PrunePlan) -> nn.Module:
    """A new model with the branches in ``keep`` removed and every other weight copied.

    The result computes what ``model`` computes with those gates fixed (see
    :func:`forced_gates`); ``model`` itself is left untouched.
    """
    from .model import MiniFusionForCausalLM

    if isinstance(keep, PrunePlan):
        keep = keep.keep
    config = pruned_config(model.config, keep)
    pruned = MiniFusionForCausalLM(config).to(next(model.parameters()).device)
    wanted = pruned.state_dict()
    state = {name: tensor for name, tensor in model.state_dict().items() if name in wanted}
    missing = sorted(set(wanted) - set(state))
    if missing:  # every weight of the pruned model must come from the original
        raise ValueError(f"The pruned model has weights the original lacks: {missing[:5]}")
    pruned.load_state_dict(state)
    with torch.no_grad():  # keep every tensor's dtype (a bf16 model stays bf16, A_log stays fp32)
        for name, tensor in [*pruned.named_parameters(), *pruned.named_buffers()]:
            if name in state and tensor.dtype != state[name].dtype:
                tensor.data = tensor.data.to(state[name].dtype)
    return pruned.eval() if not model.training else pruned


def export_pruned(model: nn.Module, keep: dict[int, str] | PrunePlan, tokenizer,
                  directory: str | Path) -> Path:  # fmt: skip
    """Prune ``model`` and write it as a Hugging Face folder (loads with ``from_pretrained``)."""
    from .checkpoint import export_pretrained

    return export_pretrained(prune_model(model, keep), tokenizer, directory).path


# ---------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    """``python -m minifusion.prune --run runs/tiny-parallel``: plan, check and export a pruned
    model.

    Reads the run's exported model (``<run>/model``), its validation tokens (``<run>/val.bin``)
    and block size (``<run>/config.yaml``); measures the gates, proposes and checks a plan,
    writes ``<run>/pruned`` and prints validation loss, parameters, decode speed and cache size
    before and after.
    """
    import argparse

    import yaml
    from transformers import AutoModelForCausalLM

    from .checkpoint import export_target_problem
    from .inference import measure_decode
    from .monitor import collect_gate_statistics
    from .tokenizer import load_tokenizer
    from .training import ValidationSet, evaluate
    from .utils import silence_library_progress_bars

    parser = argparse.ArgumentParser(prog="python -m minifusion.prune", description=main.__doc__)
    parser.add_argument("--run", required=True, type=Path, help="a finished run folder")
    parser.add_argument("--out", type=Path, help="where to export (default <run>/pruned)")
    parser.add_argument("--mamba-above", type=float, default=0.9,
                        help="a layer whose mean gate is at least this keeps only Mamba (0.9)")
    parser.add_argument("--attention-below", type=float, default=0.1,
                        help="a layer whose mean gate is at most this keeps only attention (0.1)")
    parser.add_argument("--max-loss-increase", type=float, default=0.02,
                        help="validation loss a removal may cost, nats/token")  # fmt: skip
    parser.add_argument("--blocks", type=int, default=64, help="validation blocks to measure on")
    parser.add_argument("--context", type=int, default=512, help="prompt tokens for decode timing")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (transformers' 'Loading weights' bar on stderr)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.no_progress:
        silence_library_progress_bars()

    # Every argument is checked before the minutes of gate statistics and decode timing.
    if not 0.0 <= args.attention_below < args.mamba_above <= 1.0:
        parser.error(f"--attention-below {args.attention_below:g} and --mamba-above "
                     f"{args.mamba_above:g} must satisfy 0 ≤ attention-below < mamba-above ≤ 1 "
                     "(the defaults: 0.1 and 0.9).")  # fmt: skip
    for flag, value in (("--blocks", args.blocks), ("--context", args.context)):
        if value < 1:
            parser.error(f"{flag} must be ≥ 1, not {value}.")
    if not args.max_loss_increase >= 0:
        parser.error(f"--max-loss-increase must be ≥ 0 nats/token, not {args.max_loss_increase}.")
    out = args.out or args.run / "pruned"
    if (problem := export_target_problem(out)) is not None:
        parser.error(f"--out: {problem}")
    model_dir, val_file = args.run / "model", args.run / "val.bin"
    not_a_run = "point --run at a run folder of minifusion.train"
    for needed, hint in ((model_dir, "finish the run (it exports at max_steps)"),
                         (val_file, not_a_run), (args.run / "config.yaml", not_a_run)):  # fmt: skip
        if not needed.exists():
            parser.error(f"{needed} does not exist: {hint}.")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if not hybrid_fusions(model):
        parser.error(
            f"{model_dir} has no parallel hybrid layer (mixer_types "
            f"{model.config.mixer_types}), so there is no gate to read and no branch to prune. "
            "Pruning applies to models with \"hybrid\" layers: train one with --config "
            "configs/tiny-parallel.yaml (or another preset with hybrid layers)."
        )
    block_size = yaml.safe_load((args.run / "config.yaml").read_text())["data"]["block_size"]
    tokenizer = load_tokenizer(model_dir)
    validation = ValidationSet(val_file, block_size, tokenizer)
    blocks = min(args.blocks, len(validation))
    snapshot = collect_gate_statistics(model, validation, max_blocks=blocks)
    proposal = propose_plan(
        snapshot, mamba_above=args.mamba_above, attention_below=args.attention_below
    )
    plan = check_plan(model, proposal, validation, snapshot,
                      max_loss_increase=args.max_loss_increase, max_blocks=blocks)  # fmt: skip
    print(f"gate statistics and plan on {blocks} validation blocks of {block_size} tokens:")
    print(plan.table())
    out = export_pruned(model, plan, tokenizer, out)
    pruned = AutoModelForCausalLM.from_pretrained(out).eval()
    context = min(args.context, model.config.max_position_embeddings - 32)
    print(f"\n{'':<10}{'val loss':>10}{'val bpc':>9}{'parameters':>12}"
          f"{'decode tok/s':>14}{'cache bytes':>13}  (context {context})")  # fmt: skip
    for name, candidate in (("unpruned", model), ("pruned", pruned)):
        result = evaluate(candidate, validation, batch_size=8, max_blocks=None)
        speed = measure_decode(candidate, context=context, new_tokens=32)
        parameters = sum(p.numel() for p in candidate.parameters())
        print(f"{name:<10}{result.loss:>10.4f}{result.bpc:>9.4f}{parameters:>12,}"
              f"{speed.tokens_per_s:>14.1f}{speed.cache_bytes:>13,}")  # fmt: skip
    print(f"\npruned model written to {out} (loads with AutoModelForCausalLM.from_pretrained)")
    if not plan.keep:
        print("nothing was pruned: every hybrid layer keeps both branches (its gate sits between "
              f"--attention-below {args.attention_below:g} and --mamba-above {args.mamba_above:g}, "
              "or the removal cost more than --max-loss-increase), so that copy equals the run's "
              "model. Train longer for the gates to settle, or loosen the thresholds.")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
