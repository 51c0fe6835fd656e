"""Chapter 15 — long-context checks: loss by position past the training length, and a passkey.

Two questions a reader should ask of any model that claims a long context:

* **Does it still predict well past the length it was trained on?** :func:`per_position_loss`
  scores held-out text in blocks longer than the training blocks and averages the loss at every
  position of the block. A model whose positions do not generalise (attention whose rotary angles
  were never seen that large) shows a loss that rises after the training length; one that does
  keeps it flat or falling (more context, better predictions).
* **Can it fetch one exact fact from far back?** :class:`PasskeyRetrieval` hides a few digits in
  a long run of filler and asks for them at the end (the passkey test of Mohtashami & Jaggi,
  2023, "Landmark Attention", with random filler tokens instead of a repeated sentence). Models
  are trained at a short length and :func:`accuracy_by_length` scores them at lengths up to
  64× longer: attention can look the digits up but meets unseen positions; a Mamba state has seen
  no unusual position, but must have kept the digits through thousands of filler tokens.

``bench/long_context.py`` runs the passkey with three seeds; chapter 15 shows its saved results
next to a small live run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .tasks import EVAL_SEED_OFFSET, TaskBatch, _shifted

__all__ = [
    "PasskeyRetrieval",
    "accuracy_by_length",
    "mean_by_span",
    "per_position_loss",
]


# ----------------------------------------------------------------------------------------------
# Loss at every position of long blocks
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def per_position_loss(
    model: nn.Module,
    ids: torch.Tensor | list[int],
    block_size: int,
    *,
    batch_size: int = 8,
    max_blocks: int | None = None,
) -> torch.Tensor:
    """Mean next-token loss (nats) at each position of blocks of ``block_size`` tokens.

    ``ids`` (a 1-D token stream, e.g. held-out documents joined by end-of-text) is cut into
    consecutive windows of ``block_size + 1`` tokens (each starts on the last token of the one
    before, so every token is predicted once); position ``t`` of the result is the loss
    of predicting token ``t + 1`` of a window from tokens ``0 … t``, averaged over the windows
    (the first ``max_blocks`` of them when given). Returns a float64 ``(block_size,)`` tensor.
    """
    ids = torch.as_tensor(ids, dtype=torch.long)
    windows = (ids.numel() - 1) // block_size
    if max_blocks is not None:
        windows = min(windows, max_blocks)
    if windows < 1:
        raise ValueError(
            f"The text has {ids.numel():,} tokens, fewer than one block of {block_size} + 1: "
            "give more text or a smaller block_size."
        )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    totals = torch.zeros(block_size, dtype=torch.float64)
    for first in range(0, windows, batch_size):
        starts = range(
            first * block_size, min(first + batch_size, windows) * block_size, block_size
        )
        batch = torch.stack([ids[s : s + block_size + 1] for s in starts]).to(device)
        logits = model(input_ids=batch[:, :-1]).logits.float()
        losses = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
        totals += losses.sum(dim=0).double().cpu()
    model.train(was_training)
    return totals / windows


def mean_by_span(values: torch.Tensor, edges: list[int]) -> list[float]:
    """Means of ``values`` over the spans ``[edges[i], edges[i+1])`` (e.g. before and after the
    training length)."""
    if sorted(edges) != list(edges) or edges[0] < 0 or edges[-1] > len(values):
        raise ValueError(f"edges {edges} must rise from ≥ 0 to at most {len(values)}.")
    return [float(values[a:b].mean()) for a, b in zip(edges[:-1], edges[1:])]


# ----------------------------------------------------------------------------------------------
# The passkey task
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PasskeyRetrieval:
    """A passkey of ``digits`` symbols hidden in filler, asked for at the end.

    **Vocabulary** (``vocab_size = num_filler + 2 + num_symbols``): ids ``0 … num_filler−1`` are
    filler (written ``·``), then the key marker ``K``, the query marker ``?``, and the passkey
    symbols ``0 … num_symbols−1``.

    **Sequence** (``length + 1`` tokens)::

        filler … K s_1 … s_d  filler …  ? s_1 … s_d

    The key sits at a uniformly random depth of the filler; the filler tokens are drawn uniformly,
    so nothing but the marker says where the key is. The **answer positions** are the query marker
    and the first ``d − 1`` repeated symbols (targets ``s_1 … s_d``): the last ``d`` input
    positions. Changing ``length`` (:meth:`at_length`) keeps everything else, so a model trained
    at one length is scored at others on the same kind of sequence.
    """

    length: int = 128
    digits: int = 4
    num_symbols: int = 10
    num_filler: int = 16

    def __post_init__(self) -> None:
        if min(self.digits, self.num_symbols, self.num_filler) < 1:
            raise ValueError("digits, num_symbols and num_filler must be ≥ 1.")
        if self.length < 2 * self.digits + 2:
            raise ValueError(
                f"length={self.length} cannot hold the key, the query and two copies of "
                f"{self.digits} digits: use length ≥ {2 * self.digits + 2}."
            )

    name = "passkey retrieval"

    @property
    def key_marker(self) -> int:
        return self.num_filler

    @property
    def query_marker(self) -> int:
        return self.num_filler + 1

    @property
    def vocab_size(self) -> int:
        return self.num_filler + 2 + self.num_symbols

    @property
    def seq_len(self) -> int:
        """Length ``T`` of ``inputs`` (the full sequence has ``T + 1`` tokens)."""
        return self.length

    def at_length(self, length: int) -> PasskeyRetrieval:
        """The same task with sequences of ``length`` inputs."""
        return dataclasses.replace(self, length=length)

    def answer_positions(self) -> torch.Tensor:
        """Input positions scored: the query marker and all repeated symbols but the last."""
        return torch.arange(self.length - self.digits, self.length)

    def sample(self, batch_size: int, generator: torch.Generator) -> TaskBatch:
        """``batch_size`` sequences drawn with ``generator`` (see the class docstring)."""
        d = self.digits
        filler_length = self.length - 1 - 2 * d  # the filler around the key, before the query
        sequences = torch.randint(
            self.num_filler, (batch_size, self.length + 1), generator=generator
        )
        depth = torch.randint(filler_length + 1, (batch_size,), generator=generator)
        key = self.num_filler + 2 + torch.randint(self.num_symbols, (batch_size, d),
                                                  generator=generator)  # fmt: skip
        rows = torch.arange(batch_size)[:, None]
        sequences[rows, depth[:, None] + torch.arange(d + 1)] = torch.cat(
            [torch.full((batch_size, 1), self.key_marker), key], dim=1
        )
        sequences[:, -d - 1] = self.query_marker
        sequences[:, -d:] = key
        return _shifted(sequences, self.answer_positions())

    def token_names(self, ids) -> list[str]:
        """Readable names: ``·`` filler, ``K`` key marker, ``?`` query marker, digits."""
        names = {self.key_marker: "K", self.query_marker: "?"}
        return [
            "·" if i < self.num_filler else names.get(i, str(i - self.num_filler - 2))
            for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)
        ]


@torch.no_grad()
def accuracy_by_length(
    model: nn.Module,
    task: PasskeyRetrieval,
    lengths: list[int],
    *,
    sequences: int = 32,
    batch_size: int = 8,
    seed: int = 0,
) -> dict[int, tuple[float, float]]:
    """``{length: (accuracy, exact)}``: the share of passkey symbols right and of whole passkeys
    right, over ``sequences`` held-out sequences of each length (drawn from
    ``seed + EVAL_SEED_OFFSET``, never trained on). Every length gets its own generator, so
    adding a length leaves the others' sequences unchanged."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores = {}
    for length in lengths:
        generator = torch.Generator().manual_seed(seed + EVAL_SEED_OFFSET + length)
        at_length = task.at_length(length)
        right = whole = 0
        for first in range(0, sequences, batch_size):
            batch = at_length.sample(min(batch_size, sequences - first), generator)
            logits = model(input_ids=batch.inputs.to(device)).logits
            correct = logits[batch.mask.to(device)].argmax(-1).cpu() == batch.targets[batch.mask]
            correct = correct.view(batch.inputs.shape[0], -1)
            right += int(correct.sum())
            whole += int(correct.all(dim=1).sum())
        scores[length] = (right / (sequences * task.digits), whole / sequences)
    model.train(was_training)
    return scores
