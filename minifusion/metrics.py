"""Chapter 12 — what a run measures and keeps: model statistics, ``metrics.jsonl``, the loss
curve."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from .fusion import GatedFusion
from .moe import MoE


def model_statistics(model: nn.Module) -> dict[str, float]:
    """Gate and MoE statistics from the last forward pass, flat ``name: value`` pairs.

    * ``gate/layer{i}/mean``, ``gate/layer{i}/std``: the fusion gate ``g`` (1 = all Mamba,
      0 = all attention) over the batch, per hybrid layer.
    * ``moe/layer{i}/max_load``: the busiest expert's share of the routed tokens counted
      since the last optimizer step (1/E is perfect balance; 1 means collapse onto one expert).

    The gate entries describe the last forward pass only (one micro-batch); the Trainer's
    metrics replace them with its gate monitor's values for the whole step.
    """
    stats: dict[str, float] = {}
    for name, module in model.named_modules():
        if isinstance(module, GatedFusion) and module.keep is None:
            layer = _layer_index(name)
            stats[f"gate/layer{layer}/mean"] = float(module.gate_mean)
            stats[f"gate/layer{layer}/std"] = float(module.gate_std)
        elif isinstance(module, MoE):
            load = module.load_since_update
            if float(load.sum()) > 0:
                stats[f"moe/layer{_layer_index(name)}/max_load"] = float(load.max() / load.sum())
    return stats


def _layer_index(module_name: str) -> str:
    parts = module_name.split(".")
    return parts[parts.index("layers") + 1] if "layers" in parts else module_name


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, appended and flushed as training goes.

    Training lines have ``kind="train"``, ``step``, ``loss`` (cross-entropy, nats/token),
    ``lr``, ``tokens``; evaluation lines have ``kind="eval"`` and add ``val_loss`` and
    ``val_bpc``. Plain JSON lines can be read by anything: ``pandas.read_json(path,
    lines=True)``, ``jq``, or :meth:`read`.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text("utf-8").splitlines() if line]

    def truncate_after(self, step: int) -> None:
        """Drop lines past ``step``: after a resume from ``step`` those steps are redone."""
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        tmp.replace(self.path)


def plot_loss_curve(records: list[dict[str, Any]], path: str | Path | None = None):
    """Training and validation loss against tokens seen, plus validation bits per character.

    Returns the matplotlib ``Figure``; with ``path`` it is also written as a PNG. Uses the
    object-oriented API (no pyplot), so it works in scripts, threads and notebooks alike.
    """
    from matplotlib.figure import Figure

    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    figure = Figure(figsize=(10, 3.6), layout="constrained")
    loss_axes, bpc_axes = figure.subplots(1, 2)
    loss_axes.plot([r["tokens"] for r in train], [r["loss"] for r in train], label="train")
    loss_axes.plot([r["tokens"] for r in evals], [r["val_loss"] for r in evals], "o-",
                   label="validation")  # fmt: skip
    loss_axes.set(xlabel="tokens seen", ylabel="loss (nats / token)", title="Loss")
    loss_axes.legend()
    loss_axes.grid(alpha=0.3)
    bpc_axes.plot([r["tokens"] for r in evals], [r["val_bpc"] for r in evals], "o-", color="C1")
    bpc_axes.set(xlabel="tokens seen", ylabel="bits / character", title="Validation")
    bpc_axes.grid(alpha=0.3)
    if path is not None:
        figure.savefig(path, dpi=110)
    return figure
