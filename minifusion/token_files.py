"""Chapter 03 — token files: a corpus's token ids on disk, and the blocks cut from them.

* :func:`write_token_file` writes one flat array of token ids (``uint16`` while the vocabulary
  fits, :func:`token_dtype`) and a JSON sidecar (:class:`TokenFileInfo`) that records what made
  it, written atomically so a half-written file is never taken for a finished one;
* :class:`TokenFile` opens one read-only as a memory map, refusing a truncated file or one
  made with another tokenizer;
* :class:`TokenBlocks` cuts it into ``(input, target)`` blocks, sequential or random, cheap to
  index anywhere (so resuming is instant); :class:`StreamingBlocks` packs the same blocks on
  the fly from a streamed corpus too large to tokenise ahead of time.

:func:`minifusion.data.prepare_data` writes the token files that training reads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .utils import fsync_dir

__all__ = [
    "StreamingBlocks",
    "TokenBlocks",
    "TokenFile",
    "write_token_file",
]


TOKEN_FILE_FORMAT = "minifusion-tokens-v1"


# ----------------------------------------------------------------------------------------------
# The token file: one flat array on disk + a JSON sidecar
# ----------------------------------------------------------------------------------------------
def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab ≤ 65,536): half the disk and memory of uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


@dataclass
class TokenFileInfo:
    """The sidecar ``<file>.json`` that describes a token file."""

    num_tokens: int
    dtype: str
    vocab_size: int
    tokenizer_hash: str
    eos_token_id: int
    num_documents: int
    num_characters: int
    format: str = TOKEN_FILE_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_token_file(
    tokenized,
    path: str | Path,
    tokenizer,
    *,
    extra: dict[str, Any] | None = None,
    progress: bool = True,
) -> TokenFileInfo:
    """Concatenate the ``input_ids`` of ``tokenized`` into one flat file of token ids.

    The data goes to a temporary file that is renamed into place only when complete, and the
    sidecar (written last) records the token count, so a half-written file is never mistaken
    for a finished one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(len(tokenizer))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    num_tokens = num_chars = 0
    with open(tmp, "wb") as handle:
        batches = tokenized.iter(batch_size=256)
        total = -(-len(tokenized) // 256)
        for batch in tqdm(batches, total=total, desc=f"write {path.name}", disable=not progress):
            if batch["input_ids"]:
                ids = np.concatenate([np.asarray(x, dtype=dtype) for x in batch["input_ids"]])
                ids.tofile(handle)
                num_tokens += ids.size
            num_chars += sum(batch["num_chars"])
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    info = TokenFileInfo(
        num_tokens=num_tokens,
        dtype=dtype.name,
        vocab_size=len(tokenizer),
        tokenizer_hash=_tokenizer_hash(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        num_documents=len(tokenized),
        num_characters=num_chars,
        extra=extra or {},
    )
    _atomic_write_text(_sidecar(path), json.dumps(asdict(info), indent=2))
    return info


def _tokenizer_hash(tokenizer) -> str:
    from .tokenizer import tokenizer_hash

    return tokenizer_hash(tokenizer)


class TokenFile:
    """A token file opened read-only as a NumPy memory map (nothing is loaded up front).

    Args:
        path: the token file (its sidecar is ``<path>.json``).
        expected_tokenizer_hash: if given, refuse a file made with another tokenizer.
    """

    def __init__(self, path: str | Path, expected_tokenizer_hash: str | None = None):
        self.path = Path(path)
        sidecar = _sidecar(self.path)
        if not self.path.is_file() or not sidecar.is_file():
            raise FileNotFoundError(
                f"Token file {self.path} (with its sidecar {sidecar.name}) not found. Create it "
                "with minifusion.data.prepare_data(...) or `make train`."
            )
        self.info = TokenFileInfo(**json.loads(sidecar.read_text(encoding="utf-8")))
        if self.info.format != TOKEN_FILE_FORMAT:
            raise ValueError(f"{self.path}: unknown token file format {self.info.format!r}.")
        itemsize = np.dtype(self.info.dtype).itemsize
        expected_bytes = self.info.num_tokens * itemsize
        actual_bytes = self.path.stat().st_size
        if actual_bytes != expected_bytes:
            raise ValueError(
                f"{self.path} holds {actual_bytes:,} bytes but its sidecar promises "
                f"{self.info.num_tokens:,} {self.info.dtype} tokens ({expected_bytes:,} bytes): the "
                "file is truncated or was replaced. Delete it and prepare the data again."
            )
        if (
            expected_tokenizer_hash is not None
            and self.info.tokenizer_hash != expected_tokenizer_hash
        ):
            raise ValueError(
                f"{self.path} was tokenised with tokenizer {self.info.tokenizer_hash}, but the "
                f"tokenizer in use is {expected_tokenizer_hash}. Token ids would mean different "
                "text; delete the token file and prepare the data again with this tokenizer."
            )
        self.tokens = (
            np.memmap(self.path, dtype=self.info.dtype, mode="r")
            if self.info.num_tokens
            else np.zeros(0, dtype=self.info.dtype)
        )

    def __len__(self) -> int:
        return self.info.num_tokens


class TokenBlocks(torch.utils.data.Dataset):
    """Training examples cut from a token file: ``(input, target)``, each ``(block_size,)``.

    The target is the input shifted by one token: at every position the model is asked for
    the next token. Example ``i``:

    * ``mode="sequential"``: the i-th consecutive block, ``tokens[i·B : i·B + B + 1]``; blocks
      tile the file (each block's last target is the next block's first input).
    * ``mode="random"``: a block starting at a random offset drawn from ``(seed, i)`` alone,
      so example ``i`` is the same in every run and a resumed run can continue at any index.

    Both modes have ``(num_tokens − 1) // block_size`` examples (one pass over the data).
    """

    def __init__(
        self,
        token_file: TokenFile | str | Path,
        block_size: int,
        *,
        mode: str = "sequential",
        seed: int = 0,
    ):
        self.file = token_file if isinstance(token_file, TokenFile) else TokenFile(token_file)
        if mode not in ("sequential", "random"):
            raise ValueError(f"mode={mode!r} must be 'sequential' or 'random'.")
        if block_size < 1:
            raise ValueError(f"block_size={block_size} must be ≥ 1.")
        n = len(self.file)
        if n < block_size + 1:
            raise ValueError(
                f"{self.file.path} has {n:,} tokens, fewer than one block needs "
                f"(block_size + 1 = {block_size + 1:,}: inputs plus the shifted target). Use a "
                "smaller block_size or a larger corpus."
            )
        self.block_size, self.mode, self.seed = block_size, mode, seed

    def __len__(self) -> int:
        return (len(self.file) - 1) // self.block_size

    def offset(self, index: int) -> int:
        """Position of example ``index``'s first input token in the file."""
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} out of range for {len(self)} blocks")
        if self.mode == "sequential":
            return index * self.block_size
        rng = np.random.default_rng([self.seed, index])
        return int(rng.integers(0, len(self.file) - self.block_size))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.offset(index)
        chunk = torch.from_numpy(
            self.file.tokens[start : start + self.block_size + 1].astype(np.int64)
        )
        return chunk[:-1], chunk[1:]


class StreamingBlocks(torch.utils.data.IterableDataset):
    """Pack a streamed corpus into ``(input, target)`` blocks on the fly.

    For corpora too large to tokenise ahead of time: documents are read lazily, tokenised,
    joined with ``<|endoftext|>`` and cut into blocks. With several processes, each rank reads
    its own share of the stream (``datasets.distributed.split_dataset_by_node``).
    """

    def __init__(
        self, documents, tokenizer, block_size: int, *, rank: int = 0, world_size: int = 1
    ):
        from datasets.distributed import split_dataset_by_node

        if world_size > 1:
            documents = split_dataset_by_node(documents, rank=rank, world_size=world_size)
        from .tokenizer import document_encoder

        self.documents, self.tokenizer, self.block_size = documents, tokenizer, block_size
        self.encoder = document_encoder(tokenizer)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        eos = self.tokenizer.eos_token_id
        buffer: list[int] = []
        for index, document in enumerate(self.documents):
            text = document.get("text")
            if not isinstance(text, str):
                raise ValueError(
                    f"Streamed document {index} has no text (got {type(text).__name__})."
                )
            buffer += self.encoder.encode(text, add_special_tokens=False).ids
            buffer.append(eos)
            while len(buffer) >= self.block_size + 1:
                chunk = torch.tensor(buffer[: self.block_size + 1], dtype=torch.long)
                del buffer[: self.block_size]  # the last target is the next block's first input
                yield chunk[:-1], chunk[1:]
