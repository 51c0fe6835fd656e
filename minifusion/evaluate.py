"""``python -m minifusion.evaluate``: loss, perplexity and bits per character of a model on text.

    python -m minifusion.evaluate --model runs/tiny/model --data tiny          # tiny's held-out plays
    python -m minifusion.evaluate --model runs/tiny/model --data "texts/*.txt" --block-size 512
    python -m minifusion.evaluate --model path/to/any-transformers-lm --data tiny
    python -m minifusion.evaluate --model runs/tiny/model --data tiny --block-size 1024 \
        --per-position runs/tiny/loss_by_position.csv     # does the loss rise past 256 tokens?

``--data`` is either a preset name or config file (its ``data`` section: the documents that
training held out for validation), or text files (``.txt``: one document each; ``.jsonl``: one
per line). Any causal LM folder with its tokenizer works, so models with different tokenizers
are compared on the same characters: **bits per character** divide the total loss in bits by the
characters scored, which no tokenizer changes (per-token loss and perplexity depend on it).

How the text is scored: every document is tokenized on its own and ends with the tokenizer's
end-of-text token (where it has one; it counts as one character, a document break). The
documents form one stream, cut into blocks of ``--block-size`` + 1 tokens that overlap by one, so
every token after the first is predicted exactly once, from up to ``--block-size`` tokens before
it within its block.

``--per-position FILE`` also writes the mean loss at every position of non-overlapping blocks
(:func:`minifusion.long_context.per_position_loss`) as CSV, and prints it by spans of the block:
with a block longer than the training blocks, it shows whether the model keeps predicting well
past the length it was trained on (chapter 15).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .corpus import COMMAND_LINE_REPLACE
from .model_folder import ModelFolderError, load_model_folder, resolve_device
from .utils import silence_library_progress_bars

__all__ = ["TextScore", "document_stream", "evaluation_documents", "score_stream", "main"]


@dataclass(frozen=True)
class TextScore:
    """Summed loss over the scored tokens and the characters they spell."""

    nats: float
    tokens: int
    characters: int

    @property
    def loss(self) -> float:
        """Mean loss per predicted token (nats)."""
        return self.nats / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bpc(self) -> float:
        """Bits per character: comparable across tokenizers."""
        return self.nats / math.log(2) / self.characters


def document_stream(tokenizer, texts: Sequence[str]) -> tuple[list[int], int]:
    """``(token ids of every document + end-of-text, characters they spell)``."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    characters = 0
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False).input_ids
        characters += len(text)
        if eos is not None:
            ids.append(eos)
            characters += 1  # the document break
    return ids, characters


def _blocks(ids: list[int], block_size: int) -> Iterator[torch.Tensor]:
    """Windows of ``block_size + 1`` tokens overlapping by one (the last may be shorter)."""
    for start in range(0, len(ids) - 1, block_size):
        yield torch.tensor(ids[start : start + block_size + 1])


@torch.no_grad()
def score_stream(
    model: nn.Module,
    ids: list[int],
    characters: int,
    *,
    block_size: int,
    batch_size: int = 8,
    max_blocks: int | None = None,
    progress: bool = True,
) -> TextScore:
    """Sum the model's loss over the stream ``ids`` (every token but the first predicted once).

    With ``max_blocks`` only the first blocks are scored and the characters are counted in
    proportion to the tokens scored (an estimate, said so by the command's output).
    """
    from tqdm.auto import tqdm

    if len(ids) < 2:
        raise ValueError("The text is shorter than two tokens: nothing to predict.")
    device = next(model.parameters()).device
    blocks = list(_blocks(ids, block_size))
    if max_blocks is not None:
        blocks = blocks[:max_blocks]
    full = [b for b in blocks if len(b) == block_size + 1]
    rest = [b for b in blocks if len(b) != block_size + 1]
    batches = [full[i : i + batch_size] for i in range(0, len(full), batch_size)]
    batches += [[b] for b in rest]  # the short last block on its own (no padding needed)
    nats, tokens = 0.0, 0
    with tqdm(total=len(blocks), desc="scoring", unit="block", disable=not progress) as bar:
        for batch in batches:
            stacked = torch.stack(batch).to(device)
            logits = model(input_ids=stacked[:, :-1]).logits.float()
            targets = stacked[:, 1:]
            nats += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
            tokens += targets.numel()
            bar.update(len(batch))
    if max_blocks is not None and tokens < len(ids) - 1:
        characters = round(characters * tokens / (len(ids) - 1))
    return TextScore(nats, tokens, characters)


def evaluation_documents(data: str, encoding_errors: str = "strict") -> tuple[list[str], str]:
    """``(texts, description)`` for ``--data``: a preset / config's held-out documents (the split
    training made: whole documents, ``val_fraction`` of them, or the first ``val_documents`` of a
    streamed corpus), or every document of the files ``data`` names. Bytes that are not UTF-8
    raise, unless ``encoding_errors`` or the config's ``data.encoding_errors`` is ``"replace"``."""
    from .config import PRESETS_DIR
    from .data import load_documents, split_documents
    from .settings import load_settings

    path = Path(data) if data.endswith((".yaml", ".yml")) else PRESETS_DIR / f"{data}.yaml"
    if not path.is_file():
        if data.endswith((".yaml", ".yml")):
            raise FileNotFoundError(f"--data {data}: no such config file.")
        # files; its own error names what it could not read
        documents = load_documents(data, encoding_errors=encoding_errors)
        return list(documents["text"]), f"{len(documents)} document(s) from {data}"
    settings = load_settings(path)["data"]
    if settings["streaming"]:
        stream = load_documents(settings["source"], text_field=settings["text_field"],
                                streaming=True)  # fmt: skip
        texts = [row["text"] for _, row in zip(range(int(settings["val_documents"])), stream)]
        return texts, f"{path.name}'s held-out documents (the first {len(texts)} of the stream)"
    if encoding_errors == "strict":
        encoding_errors = settings["encoding_errors"]
    documents = load_documents(settings["source"], text_field=settings["text_field"],
                               encoding_errors=encoding_errors)  # fmt: skip
    # the split prepare_data makes for training (seed 0), so these documents were never trained on
    _, validation = split_documents(documents, float(settings["val_fraction"]))
    names = list(validation["source"]) if "source" in validation.column_names else []
    shown = ", ".join(names[:4]) + (" …" if len(names) > 4 else "")
    return list(validation["text"]), f"{path.name}'s held-out documents ({shown})"


def parse_args(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog="python -m minifusion.evaluate",
        description=__doc__.split("\n\n")[0].split(": ", 1)[1],
        epilog="Example: python -m minifusion.evaluate --model runs/tiny/model --data tiny",
    )
    parser.add_argument("--model", required=True, type=Path,
                        help="a saved model folder (a run's export, or any transformers causal LM)")  # fmt: skip
    parser.add_argument("--data", required=True,
                        help="a preset name or config file (its held-out documents), or text "
                             "files: a path or glob of .txt / .jsonl")  # fmt: skip
    parser.add_argument("--block-size", type=int, default=256,
                        help="tokens of context per block (256; at most the model's positions)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=8, help="blocks per forward pass (8)")
    parser.add_argument("--max-blocks", type=int, help="score only the first N blocks (quick look)")
    parser.add_argument("--encoding-errors", choices=("strict", "replace"), default="strict",
                        help="bytes that are not UTF-8: an error naming file and line (strict, "
                             "the default, unless a --data config says replace) or U+FFFD in "
                             "their place (replace)")  # fmt: skip
    parser.add_argument("--per-position", type=Path, metavar="CSV",
                        help="also write the mean loss at every position of a block to CSV")  # fmt: skip
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser, parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    if args.no_progress:
        silence_library_progress_bars()
    if args.block_size < 1 or args.batch_size < 1:
        parser.error("--block-size and --batch-size must be at least 1.")
    if args.per_position is not None and args.per_position.is_dir():
        parser.error(f"--per-position {args.per_position} is a folder; give a CSV file to write, "
                     f"e.g. {args.per_position / 'loss_by_position.csv'}.")  # fmt: skip
    if args.max_blocks is not None and args.max_blocks < 1:
        parser.error(f"--max-blocks must be at least 1, not {args.max_blocks} (leave it out to "
                     "score every block).")  # fmt: skip
    try:
        model, tokenizer = load_model_folder(args.model, resolve_device(args.device))
        texts, description = evaluation_documents(args.data, args.encoding_errors)
    except UnicodeDecodeError as error:  # its text names the fix as training spells it
        parser.error(error.reason.replace(COMMAND_LINE_REPLACE, "--encoding-errors replace"))
    except (ModelFolderError, ValueError, FileNotFoundError, IsADirectoryError) as error:
        parser.error(str(error))
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and args.block_size > positions:
        parser.error(
            f"--block-size {args.block_size} exceeds the model's {positions} positions; "
            f"use --block-size {positions} or less."
        )
    ids, characters = document_stream(tokenizer, texts)
    print(f"model {args.model} ({sum(p.numel() for p in model.parameters()):,} parameters)")
    print(f"data  {description}: {characters:,} characters, {len(ids):,} tokens")
    score = score_stream(
        model,
        ids,
        characters,
        block_size=args.block_size,
        batch_size=args.batch_size,
        max_blocks=args.max_blocks,
        progress=not args.no_progress,
    )
    estimate = " (characters estimated: --max-blocks)" if args.max_blocks is not None else ""
    print(f"scored {score.tokens:,} tokens in blocks of {args.block_size}{estimate}")
    print(f"loss        {score.loss:.4f} nats/token")
    print(f"perplexity  {score.perplexity:.2f} (per token: depends on the tokenizer)")
    print(f"bpc         {score.bpc:.4f} bits/character (comparable across tokenizers)")
    if args.per_position is not None:
        _write_per_position(model, ids, args)
    return 0


def _write_per_position(model: nn.Module, ids: list[int], args: argparse.Namespace) -> None:
    """The ``--per-position`` report: a CSV of every position and a summary by spans."""
    from .long_context import mean_by_span, per_position_loss

    losses = per_position_loss(model, ids, args.block_size, batch_size=args.batch_size,
                               max_blocks=args.max_blocks)  # fmt: skip
    args.per_position.parent.mkdir(parents=True, exist_ok=True)
    lines = ["position,loss_nats"] + [f"{t},{loss:.6f}" for t, loss in enumerate(losses.tolist())]
    args.per_position.write_text("\n".join(lines) + "\n")
    edges = sorted({0, *(args.block_size * k // 8 for k in range(1, 9))})
    spans = mean_by_span(losses, edges)
    print(f"loss by position (nats/token), written to {args.per_position}:")
    for first, last, loss in zip(edges[:-1], edges[1:], spans):
        print(f"  positions {first:>6,}-{last - 1:<6,} {loss:.4f}")


if __name__ == "__main__":
    raise SystemExit(main())
