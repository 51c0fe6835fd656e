"""Decode speed and cache memory: MiniFusion's hybrid vs a full-attention twin vs transformers' Llama.

Three models of one shape (the ``tiny`` preset's hidden size, layers, heads, KV heads, SwiGLU width
and vocabulary, tied embeddings):

* ``hybrid`` — the preset itself: every layer Mamba ∥ attention, local + global heads;
* ``full attention`` — :func:`minifusion.inference.full_attention_config` of it: every layer plain
  attention, every head global (a Llama written with MiniFusion's code);
* ``Llama`` — transformers' ``LlamaForCausalLM`` with the same sizes, the independent reference.
  Its parameter count equals the full-attention twin's (checked); the hybrid has more (its Mamba
  branches and gates).

All three go through :func:`minifusion.inference.measure_decode`: a random prompt fills a fresh
cache, then greedy single-token steps are timed (the best of a few runs). Decode tokens/s are
reported as ratios to Llama. The cache sweep reads what each cache holds — MiniFusion's
:class:`~minifusion.cache.HybridCache`, transformers' ``DynamicCache`` — after 256 … 8192 tokens,
next to what a formula from the config predicts.

    python -m bench.decode
    python -m bench.decode --contexts 256 --cache-lengths 256 1024 --device cuda
"""

from __future__ import annotations

import argparse
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from minifusion.config import MiniFusionConfig
from minifusion.inference import full_attention_config, measure_decode
from minifusion.model import MiniFusionForCausalLM

MODELS = ("hybrid", "full_attention", "llama")
LABELS = {
    "hybrid": "MiniFusion hybrid",
    "full_attention": "MiniFusion full attention",
    "llama": "transformers Llama",
}
DEFAULT_CONTEXTS = (256, 2048)
DEFAULT_CACHE_LENGTHS = (256, 512, 1024, 2048, 4096, 8192)
DEFAULT_NEW_TOKENS = 32
# transformers' Llama of the tiny shape must have the full-attention twin's parameter count to
# within this relative difference (they are the same architecture, so it is exact in practice).
PARAMETER_TOLERANCE = 0.001


@dataclass
class DecodeSpeed:
    """Greedy decode of ``new_tokens`` tokens per sequence after a ``context``-token prompt."""

    model: str  # one of MODELS
    context: int
    new_tokens: int
    batch_size: int
    seconds: float  # best of the repeats, decode steps only
    tokens_per_s: float


@dataclass
class CacheSize:
    """What one model's cache holds after ``tokens`` tokens (batch 1)."""

    model: str
    tokens: int
    bytes: int  # read off the cache's tensors
    formula_bytes: int  # predicted from the config (a check of the measurement)


@dataclass
class DecodeResults:
    preset: str
    parameters: dict[str, int]  # per model, counted on the built modules
    speeds: list[DecodeSpeed] = field(default_factory=list)
    caches: list[CacheSize] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DecodeResults:
        return cls(
            preset=data["preset"],
            parameters=dict(data["parameters"]),
            speeds=[DecodeSpeed(**s) for s in data["speeds"]],
            caches=[CacheSize(**c) for c in data["caches"]],
        )


# ----------------------------------------------------------------------------- the models ---
def matched_llama_config(config: MiniFusionConfig):
    """transformers' ``LlamaConfig`` with ``config``'s sizes, RoPE, norm epsilon and tied head."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters=dict(config.rope_parameters),
        attention_bias=config.attention_bias,
        mlp_bias=False,
        tie_word_embeddings=config.tie_word_embeddings,
    )


def build_models(
    preset: str | MiniFusionConfig, max_positions: int, device: str | torch.device = "cpu"
) -> dict[str, nn.Module]:
    """``{"hybrid", "full_attention", "llama"}`` in eval mode, with room for ``max_positions``."""
    from transformers import LlamaForCausalLM

    config = preset_config(preset, max_positions)
    torch.manual_seed(0)
    models = {
        "hybrid": MiniFusionForCausalLM(config),
        "full_attention": MiniFusionForCausalLM(full_attention_config(config)),
        "llama": LlamaForCausalLM(matched_llama_config(config)),
    }
    return {name: model.to(device).eval() for name, model in models.items()}


def preset_config(preset: str | MiniFusionConfig, max_positions: int) -> MiniFusionConfig:
    """The preset's config with ``max_position_embeddings`` raised to ``max_positions``."""
    if isinstance(preset, MiniFusionConfig):
        return preset.replaced(max_position_embeddings=max_positions)
    return MiniFusionConfig.from_preset(preset, max_position_embeddings=max_positions)


def parameter_count(model: nn.Module) -> int:
    """Distinct parameters (a tied embedding and LM head count once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def parameter_mismatch(parameters: dict[str, int]) -> float:
    """Relative difference of Llama's count from the full-attention twin's."""
    return abs(parameters["llama"] - parameters["full_attention"]) / parameters["full_attention"]


# --------------------------------------------------------------------- the cache formulas ---
def formula_cache_bytes(config: MiniFusionConfig, tokens: int, bytes_per_value: int = 4) -> int:
    """Bytes a :class:`~minifusion.cache.HybridCache` of ``config`` should hold after ``tokens``.

    Per attention layer: keys + values of every global KV head for every token, of every local
    KV head for the last ``sliding_window`` tokens. Per Mamba layer: the conv buffer
    ``(d_inner, d_conv)`` and the scan state ``(d_inner, d_state)``, whatever ``tokens``.
    With every head global this is a plain transformer's KV cache.
    """
    group = config.num_attention_heads // config.num_key_value_heads
    global_kv = config.num_global_heads // group
    local_kv = config.num_key_value_heads - global_kv
    window = config.sliding_window or tokens
    per_attention = 2 * config.head_dim * (global_kv * tokens + local_kv * min(tokens, window))
    per_mamba = config.mamba_d_inner * (config.mamba_d_conv + config.mamba_d_state)
    total = 0
    for mixer in config.mixer_types:
        total += per_attention if mixer in ("attention", "hybrid") else 0
        total += per_mamba if mixer in ("mamba", "hybrid") else 0
    return total * bytes_per_value


def _formula_config(models: dict[str, nn.Module], name: str) -> MiniFusionConfig:
    # Llama's cache is a full KV cache of the same shape as the full-attention twin's.
    return models["full_attention" if name == "llama" else name].config


# ------------------------------------------------------------------------- measurements ---
def measure_speeds(
    models: dict[str, nn.Module],
    contexts: tuple[int, ...],
    *,
    new_tokens: int = DEFAULT_NEW_TOKENS,
    batch_size: int = 1,
    repeats: int = 3,
) -> list[DecodeSpeed]:
    """Decode tokens/s of every model after each prompt length in ``contexts``."""
    speeds = []
    for context in contexts:
        for name, model in models.items():
            m = measure_decode(
                model, context=context, new_tokens=new_tokens, batch_size=batch_size,
                repeats=repeats,
            )  # fmt: skip
            speeds.append(
                DecodeSpeed(name, context, new_tokens, batch_size, m.seconds, m.tokens_per_s)
            )
    return speeds


def measure_caches(models: dict[str, nn.Module], lengths: tuple[int, ...]) -> list[CacheSize]:
    """Cache bytes of every model holding exactly ``tokens`` tokens, for each of ``lengths``.

    The prompt is ``tokens − 1`` long and one token is decoded, so every cache has also been
    extended by a decode step (the path generation takes) when it is read.
    """
    sizes = []
    for tokens in lengths:
        for name, model in models.items():
            held = measure_decode(model, context=tokens - 1, new_tokens=1, repeats=1).cache_bytes
            formula = formula_cache_bytes(_formula_config(models, name), tokens)
            sizes.append(CacheSize(name, tokens, held, formula))
    return sizes


def run(
    preset: str | MiniFusionConfig = "tiny",
    *,
    contexts: tuple[int, ...] = DEFAULT_CONTEXTS,
    cache_lengths: tuple[int, ...] = DEFAULT_CACHE_LENGTHS,
    new_tokens: int = DEFAULT_NEW_TOKENS,
    repeats: int = 3,
    device: str | torch.device = "cpu",
) -> DecodeResults:
    """Decode speeds at ``contexts`` and cache sizes at ``cache_lengths`` for the three models."""
    max_positions = max((*contexts, 0)) + new_tokens
    max_positions = max(max_positions, *cache_lengths) if cache_lengths else max_positions
    with warnings.catch_warnings():
        # transformers warns once that a model with random weights has no generation config
        warnings.simplefilter("ignore", UserWarning)
        models = build_models(preset, max_positions, device)
        name = preset if isinstance(preset, str) else "custom"
        results = DecodeResults(name, {k: parameter_count(m) for k, m in models.items()})
        results.speeds = measure_speeds(models, contexts, new_tokens=new_tokens, repeats=repeats)
        results.caches = measure_caches(models, cache_lengths)
    return results


# ---------------------------------------------------------------------------- the tables ---
def format_speed_table(results: DecodeResults) -> str:
    """One row per (context, model): tokens/s and the ratio to Llama."""
    by_key = {(s.context, s.model): s for s in results.speeds}
    lines = [
        "| context | model | parameters | decode tokens/s | ratio to Llama |",
        "|---|---|---|---|---|",
    ]
    for context in sorted({s.context for s in results.speeds}):
        llama = by_key[(context, "llama")]
        for name in MODELS:
            s = by_key[(context, name)]
            lines.append(
                f"| {context} | {LABELS[name]} | {results.parameters[name]:,} "
                f"| {s.tokens_per_s:,.1f} | {s.tokens_per_s / llama.tokens_per_s:.2f} |"
            )
    return "\n".join(lines)


def format_cache_table(results: DecodeResults) -> str:
    """One row per length: each cache in MiB (formula in brackets) and the ratios."""
    by_key = {(c.model, c.tokens): c for c in results.caches}
    header = "| tokens | " + " | ".join(f"{LABELS[m]} MiB (formula)" for m in MODELS)
    header += " | hybrid / full attention | hybrid / Llama |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for tokens in sorted({c.tokens for c in results.caches}):
        row = [by_key[(m, tokens)] for m in MODELS]
        cells = [str(tokens)]
        cells += [f"{c.bytes / 2**20:.3f} ({c.formula_bytes / 2**20:.3f})" for c in row]
        cells += [f"{row[0].bytes / row[1].bytes:.2f}", f"{row[0].bytes / row[2].bytes:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parameter_note(results: DecodeResults) -> str:
    """How matched the models are, in one sentence."""
    p = results.parameters
    return (
        f"Parameters: Llama {p['llama']:,}, MiniFusion full attention {p['full_attention']:,} "
        f"(difference {100 * parameter_mismatch(p):.2f} %), MiniFusion hybrid {p['hybrid']:,} "
        f"({p['hybrid'] / p['llama']:.2f} × Llama's: the Mamba branches and gates)."
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--contexts", type=int, nargs="+", default=list(DEFAULT_CONTEXTS))
    parser.add_argument("--new-tokens", type=int, default=DEFAULT_NEW_TOKENS)
    parser.add_argument("--cache-lengths", type=int, nargs="*", default=list(DEFAULT_CACHE_LENGTHS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    print(
        f"Greedy decode on {args.device}, preset {args.preset!r}, batch 1: {args.new_tokens} new "
        f"tokens after each prompt length, best of {args.repeats}; the cache read after 1 decode "
        "step."
    )
    started = time.perf_counter()
    results = run(
        args.preset,
        contexts=tuple(args.contexts),
        cache_lengths=tuple(args.cache_lengths),
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        device=args.device,
    )
    print(parameter_note(results))
    print(format_speed_table(results))
    if results.caches:
        print(format_cache_table(results))
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
