"""``python -m minifusion.generate``: text from a trained model, streamed as it is produced.

    python -m minifusion.generate --model runs/tiny/model --prompt "ROMEO:"
    python -m minifusion.generate --model runs/tiny/model --prompt "JULIET:" --greedy
    python -m minifusion.generate --model runs/tiny/model --prompt-file prompts.txt

One prompt streams its continuation to the terminal token by token (transformers'
``TextStreamer``); a file gives one prompt per line, generated together as a left-padded batch
and printed when done. The model folder may be a MiniFusion export or any transformers causal LM
folder with its tokenizer.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .model_folder import ModelFolderError, load_model_folder, resolve_device
from .utils import silence_library_progress_bars

__all__ = ["SamplingSettings", "generate_texts", "main"]


@dataclass(frozen=True)
class SamplingSettings:
    """How to pick each next token: greedy, or sampling with temperature / top-k / top-p."""

    max_new_tokens: int = 100
    temperature: float = 0.8
    top_k: int | None = 50  # None: no limit
    top_p: float = 1.0
    greedy: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be at least 1.")
        if not self.greedy and self.temperature <= 0:
            raise ValueError(
                f"temperature={self.temperature} must be > 0 for sampling; use greedy decoding "
                "(--greedy) for the most likely token at every step."
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1].")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be at least 1 (no limit: None; --top-k 0 on "
                             "the command line).")

    def generate_kwargs(self) -> dict:
        """The keyword arguments of ``model.generate()``."""
        if self.greedy:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False}
        return {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": True,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
        }


def _pad_id(tokenizer) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


@torch.no_grad()
def generate_texts(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    settings: SamplingSettings,
    *,
    seed: int = 0,
    streamer=None,
) -> list[str]:
    """The continuation of every prompt (prompt included), generated as one left-padded batch.

    ``seed`` fixes the sampled tokens (the same seed gives the same text); ``streamer``: a
    transformers streamer, for a batch of one.
    """
    if not prompts:
        raise ValueError("No prompts: pass at least one.")
    if any(not p for p in prompts):
        raise ValueError("An empty prompt has nothing to continue; give each at least one word.")
    if streamer is not None and len(prompts) != 1:
        raise ValueError("Streaming shows one sequence; generate a batch without a streamer.")
    device = next(model.parameters()).device
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # new tokens follow every prompt directly
    try:
        if tokenizer.pad_token is None:
            batch = [tokenizer(p).input_ids for p in prompts]
            width = max(len(ids) for ids in batch)
            ids = torch.tensor([[_pad_id(tokenizer)] * (width - len(x)) + x for x in batch])
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch])
        else:
            encoded = tokenizer(list(prompts), return_tensors="pt", padding=True)
            ids, mask = encoded.input_ids, encoded.attention_mask
    finally:
        tokenizer.padding_side = padding_side
    torch.manual_seed(seed)
    out = model.generate(
        ids.to(device),
        attention_mask=mask.to(device),
        pad_token_id=_pad_id(tokenizer),
        streamer=streamer,
        **settings.generate_kwargs(),
    )
    return tokenizer.batch_decode(out, skip_special_tokens=True)


def read_prompts(path: Path) -> list[str]:
    """One prompt per non-empty line of a UTF-8 text file."""
    if not path.is_file():
        raise FileNotFoundError(f"--prompt-file {path} does not exist.")
    prompts = [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise ValueError(f"--prompt-file {path} has no prompt: write one per line.")
    return prompts


def parse_args(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog="python -m minifusion.generate",
        description=__doc__.split("\n\n")[0].split(": ", 1)[1],
        epilog="Example: python -m minifusion.generate --model runs/tiny/model --prompt 'ROMEO:'",
    )
    parser.add_argument("--model", required=True, type=Path,
                        help="a saved model folder (a run's export: runs/tiny/model)")  # fmt: skip
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the text to continue")
    source.add_argument(
        "--prompt-file", type=Path, help="one prompt per line, generated as a batch"
    )
    parser.add_argument("--max-new-tokens", type=int, default=100, help="tokens to add (100)")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="sampling temperature: lower is safer, higher more varied (0.8)")  # fmt: skip
    parser.add_argument("--top-k", type=int, default=50,
                        help="sample among the k most likely tokens (50; 0 for no limit)")  # fmt: skip
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="sample among the most likely tokens holding this probability (1.0)")  # fmt: skip
    parser.add_argument("--greedy", action="store_true",
                        help="always the most likely token (no sampling; ignores the three above)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives the same text (0)")
    parser.add_argument("--no-stream", action="store_true",
                        help="print a single prompt's text when done instead of token by token")  # fmt: skip
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (transformers' 'Loading weights' bar on stderr)")  # fmt: skip
    return parser, parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    if args.no_progress:
        silence_library_progress_bars()
    try:
        settings = SamplingSettings(
            args.max_new_tokens, args.temperature, args.top_k or None, args.top_p, args.greedy
        )
        prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompt_file)
        model, tokenizer = load_model_folder(args.model, resolve_device(args.device))
    except (ModelFolderError, ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    if len(prompts) == 1 and not args.no_stream:
        from transformers import TextStreamer

        streamer = TextStreamer(tokenizer, skip_special_tokens=True)
        generate_texts(model, tokenizer, prompts, settings, seed=args.seed, streamer=streamer)
        return 0
    texts = generate_texts(model, tokenizer, prompts, settings, seed=args.seed)
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- {i + 1}/{len(texts)}")
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
