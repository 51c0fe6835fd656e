"""Chapter 15 — watching the fusion gates while the model trains and evaluates.

Every hybrid layer mixes its branches with a gate ``g`` per token and channel (1 = all Mamba,
0 = all attention; chapter 10). Where the gates settle says how the model uses its two branches:
a layer whose gate stays near ½ uses both, a layer pinned near 0 or 1 has mostly stopped
listening to one of them — a candidate for pruning (:mod:`minifusion.prune`).

:class:`GateMonitor` hooks every hybrid layer's :class:`~minifusion.fusion.GatedFusion` and sums,
per layer, the gate statistics each forward pass writes into the fusion's buffers (mean, standard
deviation, per-channel mean), weighted by the number of tokens:

* during **training**, one row per optimizer step: each layer's mean and standard deviation over
  every token of the step (all micro-batches), plus the per-channel means summed until the next
  evaluation;
* during **evaluation**, one :class:`GateSnapshot` per evaluation, over every validation token.

Sums make the pieces exact to combine: the variance over all tokens is
``E[g²] − E[g]²`` with ``E[g²] = std² + mean²`` of each pass. In a distributed run the sums are
added over ranks before they are read. The history goes into every checkpoint
(:meth:`state_dict`), so a resumed run continues its plots, and is drawn as heatmaps:
layer × channel (:func:`plot_layer_channel`) and layer × step (:func:`plot_layer_step`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .fusion import GatedFusion
from .recording import not_recorded, recording_paused

__all__ = [
    "GateMonitor",
    "not_recorded",
    "GateSnapshot",
    "collect_gate_statistics",
    "hybrid_fusions",
    "plot_gate_heatmaps",
    "plot_layer_channel",
    "plot_layer_step",
]


def hybrid_fusions(model: nn.Module) -> dict[int, GatedFusion]:
    """``{layer index: GatedFusion}`` for every hybrid layer that still has both branches."""
    return {
        module.layer_idx: module
        for module in model.modules()
        if isinstance(module, GatedFusion) and module.keep is None
    }


@dataclass
class GateSnapshot:
    """Gate statistics of every hybrid layer over a stretch of tokens.

    ``layers`` lists the layer indices (rows); ``mean`` and ``std`` are ``(L,)``,
    ``channel_mean`` is ``(L, H)`` — the average gate of each channel; ``tokens`` counts the
    tokens they were averaged over (per layer, the same for all).
    """

    step: int
    split: str  # "train" (since the previous evaluation) or "val"
    layers: list[int]
    mean: torch.Tensor
    std: torch.Tensor
    channel_mean: torch.Tensor
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "split": self.split, "layers": list(self.layers),
                "mean": self.mean, "std": self.std, "channel_mean": self.channel_mean,
                "tokens": self.tokens}  # fmt: skip

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GateSnapshot:
        return cls(**values)

    def summary(self) -> list[dict[str, float]]:
        """One row per layer: mean, std, and the share of channels leaning to each side."""
        rows = []
        for i, layer in enumerate(self.layers):
            channels = self.channel_mean[i]
            rows.append({
                "layer": layer,
                "mean": float(self.mean[i]),
                "std": float(self.std[i]),
                "channel_min": float(channels.min()),
                "channel_max": float(channels.max()),
                "mamba_channels": float((channels > 0.5).float().mean()),
            })  # fmt: skip
        return rows


class _Sums:
    """Token-weighted sums of the gate statistics of ``L`` layers, ``H`` channels each."""

    def __init__(self, layers: int, hidden: int, device: torch.device | str = "cpu"):
        # float64 keeps long sums exact enough; MPS has no float64, so it sums in float32
        dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64
        self.tokens = torch.zeros(layers, dtype=dtype, device=device)
        self.mean = torch.zeros(layers, dtype=dtype, device=device)
        self.square = torch.zeros(layers, dtype=dtype, device=device)
        self.channel = torch.zeros(layers, hidden, dtype=dtype, device=device)

    def tensors(self) -> list[torch.Tensor]:
        return [self.tokens, self.mean, self.square, self.channel]

    def add(self, row: int, fusion: GatedFusion, tokens: int) -> None:
        mean = fusion.gate_mean.to(self.mean.dtype)
        std = fusion.gate_std.to(self.mean.dtype)
        self.tokens[row] += tokens
        self.mean[row] += tokens * mean
        self.square[row] += tokens * (std * std + mean * mean)
        self.channel[row] += tokens * fusion.gate_channel_mean.to(self.mean.dtype)

    def reset(self) -> None:
        for tensor in self.tensors():
            tensor.zero_()

    def statistics(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """``(mean (L,), std (L,), channel_mean (L, H), tokens)`` on the CPU, as float32."""
        tokens = self.tokens.clamp(min=1)
        mean = self.mean / tokens
        variance = (self.square / tokens - mean * mean).clamp(min=0)
        channel = self.channel / tokens[:, None]
        count = int(self.tokens[0]) if len(self.tokens) else 0
        return mean.float().cpu(), variance.sqrt().float().cpu(), channel.float().cpu(), count


class GateMonitor:
    """Per-layer gate statistics of ``model``'s hybrid layers, per training step and evaluation.

    Use it around training (the :class:`~minifusion.training.Trainer` does)::

        monitor = GateMonitor(model)          # hooks every hybrid layer
        ...train one step (any number of forward passes)...
        monitor.end_step(step)                # one row of means and stds per layer
        with monitor.evaluating(step):        # every forward inside counts as validation
            ...evaluate...
        monitor.evaluations[-1]               # a GateSnapshot over the validation tokens

    ``reduce``: a function that sums a tensor across processes in place (``dist.all_reduce``), for
    distributed runs; every rank must then call :meth:`end_step` and :meth:`evaluating` alike.
    A model without hybrid layers gives an empty monitor.
    """

    def __init__(self, model: nn.Module, *, reduce: Callable[[torch.Tensor], object] | None = None):
        fusions = hybrid_fusions(model)
        self.layers: list[int] = sorted(fusions)
        self.hidden = int(model.config.hidden_size)
        self.reduce = reduce
        device = next(model.parameters()).device
        size = (len(self.layers), self.hidden)
        self._step = _Sums(*size, device=device)  # this optimizer step
        self._train = _Sums(*size, device=device)  # training since the last evaluation
        self._eval = _Sums(*size, device=device)
        self._evaluating = False
        self.steps: list[int] = []
        self.step_mean: list[list[float]] = []  # one row per step, one value per layer
        self.step_std: list[list[float]] = []
        self.evaluations: list[GateSnapshot] = []
        self.train_windows: list[GateSnapshot] = []
        self._handles = [
            fusion.register_forward_hook(self._hook(row))
            for row, fusion in enumerate(fusions[layer] for layer in self.layers)
        ]

    def __len__(self) -> int:
        return len(self.layers)

    def _hook(self, row: int):
        def record(fusion: GatedFusion, inputs: tuple, output: torch.Tensor) -> None:
            if fusion.forced_gate is not None or recording_paused():
                return  # a measurement with the gate fixed, or a pass that scores nothing
            tokens = output.shape[:-1].numel()
            if self._evaluating:
                self._eval.add(row, fusion, tokens)
            elif fusion.training:
                self._step.add(row, fusion, tokens)
                self._train.add(row, fusion, tokens)

        return record

    def remove(self) -> None:
        """Detach the hooks (the history stays)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _reduced(self, sums: _Sums) -> _Sums:
        if self.reduce is not None and self.layers:
            for tensor in sums.tensors():
                self.reduce(tensor)
        return sums

    # ------------------------------------------------------------------ recording
    def end_step(self, step: int) -> None:
        """Close optimizer step ``step``: store each layer's mean and std over its tokens."""
        if not self.layers:
            return
        mean, std, _, tokens = self._reduced(self._step).statistics()
        self._step.reset()
        if tokens == 0:
            return  # no training forward pass since the last step
        self.steps.append(int(step))
        self.step_mean.append(mean.tolist())
        self.step_std.append(std.tolist())

    @contextmanager
    def evaluating(self, step: int) -> Iterator[None]:
        """Count the forward passes inside as validation; store a snapshot at the end.

        The training tokens seen since the previous evaluation become a ``"train"`` snapshot too.
        """
        self._evaluating = True
        try:
            yield
        finally:
            self._evaluating = False
        if self.layers:
            self.evaluations.append(self._snapshot(self._eval, step, "val"))
            self._eval.reset()
            train = self._snapshot(self._train, step, "train")
            self._train.reset()
            if train.tokens:
                self.train_windows.append(train)

    def _snapshot(self, sums: _Sums, step: int, split: str) -> GateSnapshot:
        mean, std, channel, tokens = self._reduced(sums).statistics()
        return GateSnapshot(int(step), split, list(self.layers), mean, std, channel, tokens)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The whole history (plain lists and CPU tensors), for a checkpoint."""
        return {
            "layers": list(self.layers),
            "steps": list(self.steps),
            "step_mean": [list(row) for row in self.step_mean],
            "step_std": [list(row) for row in self.step_std],
            "evaluations": [s.to_dict() for s in self.evaluations],
            "train_windows": [s.to_dict() for s in self.train_windows],
            "train_sums": [t.cpu().clone() for t in self._train.tensors()],
        }

    def load_state_dict(self, state: dict[str, Any], *, pending: bool = True) -> None:
        """Restore the history; ``pending=False`` leaves out the training sums not yet in a
        snapshot (in a distributed run only one rank takes them back, as they were saved)."""
        if list(state["layers"]) != self.layers:
            raise ValueError(
                f"The saved gate history covers hybrid layers {state['layers']}, this model has "
                f"{self.layers}: it belongs to another model layout."
            )
        self.steps = list(state["steps"])
        self.step_mean = [list(row) for row in state["step_mean"]]
        self.step_std = [list(row) for row in state["step_std"]]
        self.evaluations = [GateSnapshot.from_dict(s) for s in state["evaluations"]]
        self.train_windows = [GateSnapshot.from_dict(s) for s in state["train_windows"]]
        self._train.reset()
        if pending:
            for tensor, saved in zip(self._train.tensors(), state["train_sums"]):
                tensor.copy_(saved)

    def step_matrix(self) -> torch.Tensor:
        """``(L, steps)``: each layer's mean gate at every recorded step."""
        return torch.tensor(self.step_mean, dtype=torch.float32).reshape(-1, len(self)).T


@torch.no_grad()
def collect_gate_statistics(
    model: nn.Module,
    validation,
    *,
    batch_size: int = 8,
    max_blocks: int | None = None,
    device: torch.device | str | None = None,
    step: int = 0,
) -> GateSnapshot:
    """Evaluate ``model`` on a :class:`~minifusion.training.ValidationSet` and return the gate
    statistics of every hybrid layer over those tokens (``max_blocks``: the first blocks only)."""
    from .evaluation import evaluate

    device = device or next(model.parameters()).device
    monitor = GateMonitor(model)
    if not monitor.layers:
        raise ValueError("The model has no hybrid layer, so there is no gate to measure.")
    try:
        with monitor.evaluating(step):
            evaluate(model, validation, batch_size=batch_size, max_blocks=max_blocks,
                     device=torch.device(device))  # fmt: skip
    finally:
        monitor.remove()
    return monitor.evaluations[-1]


# ---------------------------------------------------------------------------------- plots
_GATE_LABEL = "gate g (1 = Mamba, 0 = attention)"


def _panel_height(rows: int) -> float:
    """Inches for a heatmap of ``rows`` layers: tall enough for the colorbar's label."""
    return max(2.6, 0.5 + 0.45 * rows)


def plot_layer_channel(snapshot: GateSnapshot, ax=None, *, colorbar: bool = True):
    """Heatmap of the per-channel mean gate: one row per hybrid layer, one column per channel."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(8, _panel_height(len(snapshot.layers))))[1]
    image = ax.imshow(snapshot.channel_mean.numpy(), aspect="auto", cmap="coolwarm",
                      vmin=0.0, vmax=1.0, interpolation="nearest")  # fmt: skip
    ax.set_yticks(range(len(snapshot.layers)), [f"layer {i}" for i in snapshot.layers])
    ax.set_xlabel("channel")
    ax.set_title(f"mean gate per channel ({snapshot.split}, step {snapshot.step})")
    if colorbar:
        ax.figure.colorbar(image, ax=ax, label=_GATE_LABEL)
    return ax


def plot_layer_step(monitor: GateMonitor, ax=None, *, colorbar: bool = True):
    """Heatmap of each hybrid layer's mean gate (rows) at every training step (columns)."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(8, _panel_height(len(monitor))))[1]
    matrix = monitor.step_matrix().numpy()
    first, last = (monitor.steps[0], monitor.steps[-1]) if monitor.steps else (0, 0)
    image = ax.imshow(matrix, aspect="auto", cmap="coolwarm", vmin=0.0, vmax=1.0,
                      interpolation="nearest", extent=(first - 0.5, last + 0.5,
                                                       len(monitor) - 0.5, -0.5))  # fmt: skip
    ax.set_yticks(range(len(monitor)), [f"layer {i}" for i in monitor.layers])
    ax.set_xlabel("training step")
    ax.set_title("mean gate per layer during training")
    if colorbar:
        ax.figure.colorbar(image, ax=ax, label=_GATE_LABEL)
    return ax


def plot_gate_heatmaps(monitor: GateMonitor, path: str | Path | None = None):
    """Both heatmaps in one figure (layer × step above, layer × channel of the last evaluation
    below); saved to ``path`` when given. Returns the figure, or ``None`` with nothing to draw."""
    if not monitor.layers or not monitor.steps:
        return None
    import matplotlib.pyplot as plt

    rows = 2 if monitor.evaluations else 1
    height = rows * (0.4 + _panel_height(len(monitor)))
    fig, axes = plt.subplots(rows, 1, figsize=(8, height), squeeze=False)
    plot_layer_step(monitor, axes[0][0])
    if monitor.evaluations:
        plot_layer_channel(monitor.evaluations[-1], axes[1][0])
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig
