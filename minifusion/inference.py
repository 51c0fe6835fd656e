"""Chapter 15 — measuring generation: decode speed and what the cache holds.

Generating text runs the model once over the prompt (*prefill*) and then once per new token
(*decode*), each step reading the cache the earlier steps wrote (chapter 11). Two numbers decide
what serving a model costs:

* **decode tokens/s** — new tokens per second once the prompt is in the cache;
* **cache bytes** — what the cache holds after ``context`` tokens. A plain transformer keeps
  every key and value of every layer, so its cache grows linearly with the context. MiniFusion's
  hybrid cache keeps every key only for the global heads, the last ``sliding_window`` keys for the
  local heads, and a fixed-size state for each Mamba branch.

:func:`measure_decode` measures both on any causal LM that takes a cache — ours (with a
:class:`~minifusion.cache.HybridCache`) or a transformers model (with its own ``DynamicCache``),
so the same loop times the reference. :func:`full_attention_config` gives the comparison model:
the same shape with every layer a full-attention (Llama) layer.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import nn

from .cache import HybridCache
from .compat import cache_keyword
from .config import MiniFusionConfig

__all__ = [
    "DecodeMeasurement", "cache_bytes", "full_attention_config", "measure_decode", "new_cache",
]  # fmt: skip


@dataclass
class DecodeMeasurement:
    """One decode timing: ``new_tokens`` tokens per sequence after a ``context``-token prompt."""

    context: int  # prompt tokens in the cache before the timed steps
    new_tokens: int  # tokens decoded per sequence (timed)
    batch_size: int
    seconds: float  # best of the repeats, decode steps only (no prefill)
    cache_bytes: int  # bytes the cache holds after the prompt and the new tokens
    prefill_seconds: float = float("nan")  # the prompt's forward pass into a fresh cache

    @property
    def tokens_per_s(self) -> float:
        return self.batch_size * self.new_tokens / self.seconds


def full_attention_config(config: MiniFusionConfig) -> MiniFusionConfig:
    """``config`` with every layer a full-attention layer (all heads global, no window).

    Same hidden size, heads, KV heads and FFNs, and a dense FFN where ``config`` has none (a
    Mamba layer without one): the transformer whose KV cache a hybrid cache is compared with.
    (Its parameter count differs where Mamba branches and gates were.)
    """
    return config.replaced(
        mixer_types=["attention"] * config.num_hidden_layers,
        ffn_types=["dense" if ffn == "none" else ffn for ffn in config.ffn_types],
        num_global_heads=config.num_attention_heads,
        global_attention_layers=None,
        sliding_window=None,
        pruned_fusion_layers=[],
    )


def cache_bytes(cache) -> int:
    """Bytes held by a :class:`HybridCache` or a transformers ``Cache`` (its key/value tensors)."""
    if isinstance(cache, HybridCache):
        return sum(cache.memory_bytes().values())
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def new_cache(model: nn.Module, batch_size: int, max_length: int | None = None):
    """An empty cache for ``model``: a :class:`HybridCache` (room for ``max_length`` tokens
    reserved) for MiniFusion, transformers' ``DynamicCache`` for anything else."""
    from .model import MiniFusionForCausalLM

    if isinstance(model, MiniFusionForCausalLM):
        return HybridCache(model.model, batch_size=batch_size, max_length=max_length)
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


@torch.inference_mode()
def measure_decode(
    model: nn.Module,
    *,
    context: int,
    new_tokens: int = 32,
    batch_size: int = 1,
    repeats: int = 3,
    seed: int = 0,
    prefill_repeats: int = 1,
) -> DecodeMeasurement:
    """Greedy-decode ``new_tokens`` tokens after a random ``context``-token prompt; time the decode.

    The prompt is run into a fresh cache (the *prefill*, timed separately), then ``new_tokens``
    single-token forward passes run, each feeding back its argmax. Every repeat decodes from a
    copy of the same prompt cache, so a long prompt is computed once (``prefill_repeats`` > 1
    recomputes it in the first repeats to time it more than once). The best of the repeats is
    kept (the least disturbed by other work on the machine). A MiniFusion cache is told the
    final length up front, so its buffers never grow inside the timed loop; transformers'
    ``DynamicCache`` appends as it always does. Works for MiniFusion models and for
    transformers' causal LMs, so both go through the same loop.
    """
    if context < 1 or new_tokens < 1:
        raise ValueError(f"context and new_tokens must be ≥ 1 (got {context}, {new_tokens}).")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and context + new_tokens > limit:
        raise ValueError(
            f"context + new_tokens = {context + new_tokens} exceeds the model's "
            f"max_position_embeddings = {limit}: shorten the context or raise that setting."
        )
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(
        0, model.config.vocab_size, (batch_size, context), generator=generator
    ).to(device)

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    best = prefill = float("inf")
    try:
        for repeat in range(max(repeats, 1)):
            if repeat < prefill_repeats or repeat == 0:
                cache = new_cache(model, batch_size, context + new_tokens)
                synchronize()
                start = time.perf_counter()
                out = model(input_ids=prompt, **cache_keyword(cache), use_cache=True,
                            logits_to_keep=1)  # fmt: skip
                synchronize()
                prefill = min(prefill, time.perf_counter() - start)
                prompt_cache, first = cache, out.logits[:, -1:].argmax(-1)
            # every repeat decodes from the same prompt cache (a copy: decoding extends it)
            cache, token = copy.deepcopy(prompt_cache), first
            synchronize()
            start = time.perf_counter()
            for _ in range(new_tokens):
                out = model(input_ids=token, **cache_keyword(cache), use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
            synchronize()
            best = min(best, time.perf_counter() - start)
        held = cache_bytes(cache)
    finally:
        model.train(was_training)
    return DecodeMeasurement(context, new_tokens, batch_size, best, held, prefill)
