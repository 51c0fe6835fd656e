"""Chapter 12 — resumable batches: batch ``n`` is a pure function of ``(seed, n)``.

:class:`BatchStream` samples blocks of a memory-mapped token file; :class:`StreamingBatches`
reads a streamed corpus in order. Both report a ``position`` that a checkpoint saves, so a
resumed run reads exactly what an uninterrupted run would have read (chapter 13).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from .data import TokenBlocks, TokenFile


class BatchStream:
    """Training batches drawn from a token file, resumable at any position.

    Example ``k`` (counted from the start of training) is a block at a random offset drawn from
    ``(seed, epoch, k mod n)`` where ``n`` is the number of blocks per pass over the file. The
    only state is ``position`` — the number of examples consumed — so saving that one integer
    is enough to continue exactly. With several processes, rank ``r`` of ``world_size`` takes
    every ``world_size``-th batch-sized slice, so ranks never read the same example.
    """

    def __init__(
        self,
        token_file: TokenFile | str | Path,
        block_size: int,
        batch_size: int,
        *,
        seed: int = 0,
        position: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.file = token_file if isinstance(token_file, TokenFile) else TokenFile(token_file)
        self.block_size, self.batch_size, self.seed = block_size, batch_size, seed
        self.position, self.rank, self.world_size = position, rank, world_size
        self._epoch_blocks: dict[int, TokenBlocks] = {}
        self.examples_per_epoch = len(self._blocks(0))

    def _blocks(self, epoch: int) -> TokenBlocks:
        if epoch not in self._epoch_blocks:
            self._epoch_blocks = {  # keep one epoch: each holds only its seed
                epoch: TokenBlocks(
                    self.file, self.block_size, mode="random", seed=self.seed * 1_000_003 + epoch
                )
            }
        return self._epoch_blocks[epoch]

    def example(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = divmod(k, self.examples_per_epoch)
        return self._blocks(epoch)[index]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)``, each ``(batch_size, block_size)`` int64."""
        start = self.position + self.rank * self.batch_size
        pairs = [self.example(k) for k in range(start, start + self.batch_size)]
        self.position += self.batch_size * self.world_size
        return torch.stack([x for x, _ in pairs]), torch.stack([y for _, y in pairs])

    @property
    def epoch(self) -> float:
        return self.position / self.examples_per_epoch


class StreamingBatches:
    """Training batches packed on the fly from a streamed corpus — for data too big to tokenise.

    The same interface as :class:`BatchStream` (``next_batch()``, ``position``, ``rank``,
    ``world_size``, ``epoch``), fed by :class:`~minifusion.data.StreamingBlocks`: documents are
    read in order, tokenised, packed into blocks, and split between ranks by
    ``datasets.distributed.split_dataset_by_node`` (whole files or shards per rank when their
    number divides evenly, otherwise every ``world_size``-th document). A rank that reaches the
    end of its share starts it again.

    ``position`` counts examples consumed by all ranks together, as in :class:`BatchStream`. A
    stream cannot jump, so resuming at ``position`` re-reads and discards the first
    ``position / world_size`` blocks of this rank's share: exact at the same world size, and
    close to where the run was (not the same blocks) at another one.

    Args:
        documents: an iterable ``datasets.IterableDataset`` with a ``text`` column (for example
            :meth:`~minifusion.data.PreparedStream.training_documents`).
        tokenizer: the run's tokenizer.
        block_size, batch_size: as for :class:`BatchStream`.
    """

    def __init__(
        self,
        documents,
        tokenizer,
        block_size: int,
        batch_size: int,
        *,
        position: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.documents, self.tokenizer = documents, tokenizer
        self.block_size, self.batch_size = block_size, batch_size
        self.position, self.rank, self.world_size = position, rank, world_size
        self.completed_passes = 0
        self._examples: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._expected: tuple[int, int, int] | None = None  # (position, rank, world_size)

    def _endless(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from .data import StreamingBlocks

        self.completed_passes = 0
        while True:
            blocks = StreamingBlocks(self.documents, self.tokenizer, self.block_size,
                                     rank=self.rank, world_size=self.world_size)  # fmt: skip
            empty = True
            for pair in blocks:
                empty = False
                yield pair
            if empty:
                raise ValueError(
                    f"Rank {self.rank} of {self.world_size} got no complete block of "
                    f"{self.block_size + 1} tokens from its share of the stream. Use more or "
                    "longer documents, a smaller block_size, or fewer processes."
                )
            self.completed_passes += 1

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)``, each ``(batch_size, block_size)`` int64."""
        if self._expected != (self.position, self.rank, self.world_size):
            # First call, or position / rank changed from outside (a resume): start the stream
            # again and skip what this rank has already consumed.
            self._examples = self._endless()
            for _ in range(self.position // self.world_size):
                next(self._examples)
        pairs = [next(self._examples) for _ in range(self.batch_size)]
        self.position += self.batch_size * self.world_size
        self._expected = (self.position, self.rank, self.world_size)
        return torch.stack([x for x, _ in pairs]), torch.stack([y for _, y in pairs])

    @property
    def epoch(self) -> float:
        """Completed passes over this rank's share (the stream's length is not known ahead)."""
        return float(self.completed_passes)
