"""Decode speed, prefill time and cache memory: MiniFusion's hybrid vs a full-attention twin vs
transformers' Llama.

Three models (the preset's hidden size, layers, heads, KV heads and vocabulary, tied embeddings):

* ``hybrid`` — the preset itself (for ``tiny``: attention and Mamba layers taking turns, global
  heads only where ``global_attention_layers`` puts them, local heads elsewhere);
* ``full attention`` — :func:`minifusion.inference.full_attention_config` of it: every layer plain
  attention with a dense FFN, every head global (a Llama written with MiniFusion's code);
* ``Llama`` — transformers' ``LlamaForCausalLM`` of the same sizes, the independent reference, with
  its SwiGLU width solved so that its parameter count equals the hybrid's *active* parameter count
  (:func:`llama_matched_to`; checked to within :data:`PARAMETER_TOLERANCE`). The hybrid's Mamba
  layers have no feed-forward block, so a Llama of the same shape would be larger than the hybrid
  (the full-attention twin is that model).

All three go through :func:`minifusion.inference.measure_decode`: a random prompt fills a fresh
cache (that forward pass is the *prefill*, timed on its own), then greedy single-token steps are
timed (the best of a few runs, each from a copy of the prompt's cache), at every context and
batch size asked for. Decode tokens/s and prefill times are reported as ratios to Llama. The
cache sweep reads what each cache holds — MiniFusion's :class:`~minifusion.cache.HybridCache`,
transformers' ``DynamicCache`` — after 256 … 16,384 tokens, next to what the config's
:meth:`~minifusion.config.MiniFusionConfig.cache_bytes` formula predicts.

Its two sections of ``bench/RESULTS.md`` — decode speed (:func:`decode_table`,
:func:`decode_reading`, :func:`decode_detail`) and cache memory (:func:`cache_table`,
:func:`cache_reading`, :func:`cache_detail`) — are rendered here from the data
:mod:`bench.report` stores (one column group per device); :func:`_headline_decode` and
:func:`_headline_cache` give their rows of the README's headline table.

    python -m bench.decode
    python -m bench.decode --preset small --contexts 256 2048 --batch-sizes 1
    python -m bench.decode --contexts 256 --cache-lengths 256 1024 --device cuda
"""

from __future__ import annotations

import argparse
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from minifusion.compat import cache_keyword
from minifusion.config import MiniFusionConfig
from minifusion.inference import full_attention_config, measure_decode, new_cache
from minifusion.model import MiniFusionForCausalLM

from .arguments import non_negative_int, positive_int
from .tables import Data, PerDevice, _ratio, _sorted_union, grouped_table

MODELS = ("hybrid", "full_attention", "llama")
LABELS = {
    "hybrid": "MiniFusion hybrid",
    "full_attention": "MiniFusion full attention",
    "llama": "transformers Llama",
}
DEFAULT_CONTEXTS = (256, 2048, 8192, 16384)
DEFAULT_BATCH_SIZES = (1, 8)
DEFAULT_CACHE_LENGTHS = (256, 1024, 2048, 4096, 8192, 16384)
DEFAULT_PREFILL_CONTEXT = 8192
DEFAULT_NEW_TOKENS = 32
# transformers' Llama must have the hybrid's active parameter count to within this relative
# difference (its SwiGLU width moves the count in steps of 3 · hidden · layers parameters).
PARAMETER_TOLERANCE = 0.005


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
class PrefillTime:
    """One forward pass of a ``context``-token prompt into a fresh cache (batch 1)."""

    model: str
    context: int
    seconds: float  # best of the repeats


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
    prefills: list[PrefillTime] = field(default_factory=list)
    ops_per_token: dict[str, int] = field(default_factory=dict)  # ATen ops in one decode step

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DecodeResults:
        return cls(
            preset=data["preset"],
            parameters=dict(data["parameters"]),
            speeds=[DecodeSpeed(**s) for s in data["speeds"]],
            caches=[CacheSize(**c) for c in data["caches"]],
            prefills=[PrefillTime(**p) for p in data.get("prefills", [])],
            ops_per_token=dict(data.get("ops_per_token", {})),
        )

    def batch_sizes(self) -> list[int]:
        return sorted({s.batch_size for s in self.speeds})


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


def llama_matched_to(config: MiniFusionConfig):
    """Llama of ``config``'s sizes whose parameter count equals ``config``'s active parameters: the
    full-attention shape of ``config`` with the SwiGLU width solved (every Llama layer has one; a
    channel of it costs ``3 · hidden_size`` parameters per layer)."""
    layers = config.num_hidden_layers
    # every layer attention with a dense SwiGLU (where the preset has MoE, Llama has dense layers)
    # and plain attention: Llama has no QK-norm and no output gate, so the FFN absorbs them too
    full = full_attention_config(config).replaced(ffn_types=["dense"] * layers,
                                                  attention_qk_norm=False,
                                                  attention_output_gate=False)  # fmt: skip
    per_channel = 3 * full.hidden_size * layers
    without_ffn = full.replaced(intermediate_size=1).estimate_parameters() - per_channel
    intermediate = round((config.estimate_active_parameters() - without_ffn) / per_channel)
    if intermediate < 1:
        raise ValueError(
            f"{config.estimate_active_parameters():,} active parameters leave no room for a "
            f"feed-forward block in a Llama of this shape ({without_ffn:,} without one)."
        )
    return matched_llama_config(full.replaced(intermediate_size=intermediate))


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
        "llama": LlamaForCausalLM(llama_matched_to(config)),
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
    """Relative difference of Llama's count from the hybrid's active count (``hybrid_active``,
    or the hybrid's whole count in results saved without it)."""
    target = parameters.get("hybrid_active", parameters["hybrid"])
    return abs(parameters["llama"] - target) / target


# --------------------------------------------------------------------- the cache formulas ---
def formula_cache_bytes(config: MiniFusionConfig, tokens: int, bytes_per_value: int = 4) -> int:
    """Bytes a :class:`~minifusion.cache.HybridCache` of ``config`` should hold after ``tokens``
    (batch 1): :meth:`MiniFusionConfig.cache_bytes`. With every head global this is a plain
    transformer's KV cache."""
    return config.cache_bytes(tokens, batch_size=1, bytes_per_value=bytes_per_value)


def _formula_config(models: dict[str, nn.Module], name: str) -> MiniFusionConfig:
    # Llama's cache is a full KV cache of the same shape as the full-attention twin's.
    return models["full_attention" if name == "llama" else name].config


# ------------------------------------------------------------------------- measurements ---
def measure_speeds(
    models: dict[str, nn.Module],
    contexts: tuple[int, ...],
    *,
    new_tokens: int = DEFAULT_NEW_TOKENS,
    batch_sizes: tuple[int, ...] = (1,),
    repeats: int = 3,
) -> list[DecodeSpeed]:
    """Decode tokens/s of every model after each prompt length in ``contexts``, per batch size."""
    speeds = []
    for batch_size in batch_sizes:
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


def measure_prefills(
    models: dict[str, nn.Module], context: int, repeats: int = 2
) -> list[PrefillTime]:
    """Seconds of one ``context``-token prompt's forward pass (batch 1), best of ``repeats``."""
    return [
        PrefillTime(name, context, measure_decode(
            model, context=context, new_tokens=1, repeats=repeats, prefill_repeats=repeats
        ).prefill_seconds)
        for name, model in models.items()
    ]  # fmt: skip


class _OpCounter(TorchDispatchMode):
    """Counts the ATen operations that run (each is a kernel call and its Python overhead)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


@torch.inference_mode()
def ops_per_token(model: nn.Module, context: int = 64) -> int:
    """ATen operations in one greedy decode step after a ``context``-token prompt (batch 1).

    On a small model each operation costs about as much in dispatch as in arithmetic, so this
    count is what decoding at short contexts pays for.
    """
    prompt = torch.randint(0, model.config.vocab_size, (1, context))
    prompt = prompt.to(next(model.parameters()).device)
    cache = new_cache(model, batch_size=1)
    out = model(input_ids=prompt, **cache_keyword(cache), use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1:].argmax(-1)
    model(input_ids=token, **cache_keyword(cache), use_cache=True)  # warm (first-step paths)
    with _OpCounter() as counter:
        model(input_ids=token, **cache_keyword(cache), use_cache=True)
    return counter.count


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
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
    cache_lengths: tuple[int, ...] = DEFAULT_CACHE_LENGTHS,
    prefill_context: int | None = DEFAULT_PREFILL_CONTEXT,
    new_tokens: int = DEFAULT_NEW_TOKENS,
    repeats: int = 3,
    device: str | torch.device = "cpu",
) -> DecodeResults:
    """Decode speeds at ``contexts`` × ``batch_sizes``, the prefill time of a
    ``prefill_context``-token prompt (None: skipped) and cache sizes at ``cache_lengths``."""
    lengths = [*contexts, *cache_lengths, prefill_context or 0]
    max_positions = max(lengths) + new_tokens
    with warnings.catch_warnings():
        # transformers warns once that a model with random weights has no generation config
        warnings.simplefilter("ignore", UserWarning)
        models = build_models(preset, max_positions, device)
        name = preset if isinstance(preset, str) else "custom"
        results = DecodeResults(name, {k: parameter_count(m) for k, m in models.items()})
        results.parameters["hybrid_active"] = models["hybrid"].config.estimate_active_parameters()
        results.ops_per_token = {k: ops_per_token(m) for k, m in models.items()}
        results.speeds = measure_speeds(
            models, contexts, new_tokens=new_tokens, batch_sizes=batch_sizes, repeats=repeats
        )
        if prefill_context:
            results.prefills = measure_prefills(models, prefill_context)
        results.caches = measure_caches(models, cache_lengths)
    return results


# ---------------------------------------------------------------------------- the tables ---
def format_speed_table(results: DecodeResults) -> str:
    """One row per (batch, context, model): tokens/s and the ratio to Llama."""
    by_key = {(s.batch_size, s.context, s.model): s for s in results.speeds}
    lines = [
        "| batch | context | model | parameters | decode tokens/s | ratio to Llama |",
        "|---|---|---|---|---|---|",
    ]
    for batch in results.batch_sizes():
        for context in sorted({s.context for s in results.speeds if s.batch_size == batch}):
            llama = by_key[(batch, context, "llama")]
            for name in MODELS:
                s = by_key[(batch, context, name)]
                lines.append(
                    f"| {batch} | {context} | {LABELS[name]} | {results.parameters[name]:,} "
                    f"| {s.tokens_per_s:,.1f} | {s.tokens_per_s / llama.tokens_per_s:.2f} |"
                )
    return "\n".join(lines)


def format_prefill_table(results: DecodeResults) -> str:
    """One row per model: prefill seconds and the ratio to Llama's."""
    by_model = {p.model: p for p in results.prefills}
    lines = ["| prompt tokens | model | prefill s | ratio to Llama |", "|---|---|---|---|"]
    for name in MODELS:
        p = by_model[name]
        ratio = p.seconds / by_model["llama"].seconds
        lines.append(f"| {p.context} | {LABELS[name]} | {p.seconds:.3f} | {ratio:.2f} |")
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


FORMULA_PRESETS = ("tiny", "tiny-parallel", "small", "fusiontree-1.5b")
FORMULA_TOKENS = (2048, 8192, 16384, 32768)


def preset_cache_table(
    presets: tuple[str, ...] = FORMULA_PRESETS, tokens: tuple[int, ...] = FORMULA_TOKENS
) -> str:
    """The cache formula of every preset (computed from the configs, not measured): what it
    holds whatever the length, what each token adds, and its size relative to the same shape
    with every layer full attention (a Llama's cache), fp32, batch 1."""
    head = " | ".join(f"÷ full attention at {n:,}" for n in tokens)
    lines = [
        f"| preset | layers with global heads | fixed bytes | bytes per token | {head} |",
        "|---|---|---|---|" + "---|" * len(tokens),
    ]
    for name in presets:
        config = MiniFusionConfig.from_preset(name)
        full = full_attention_config(config)
        per_token = config.cache_bytes(2) - config.cache_bytes(1)  # it is linear from 1 token
        fixed = config.cache_bytes(1) - per_token
        attention = [i for i, m in enumerate(config.mixer_types) if m in ("attention", "hybrid")]
        placed = [i for i in attention if config.global_heads_of(i)]
        ratios = " | ".join(f"{config.cache_bytes(n) / full.cache_bytes(n):.3f}" for n in tokens)
        lines.append(
            f"| {name} | {len(placed)} of {len(attention)} | {fixed:,} | {per_token:,} | {ratios} |"
        )
    return "\n".join(lines)


def parameter_note(results: DecodeResults) -> str:
    """How matched the models are, and how many operations a decode step runs."""
    p = results.parameters
    active = p.get("hybrid_active", p["hybrid"])
    note = (
        f"Parameters: MiniFusion hybrid {p['hybrid']:,} ({active:,} active), transformers Llama "
        f"{p['llama']:,} (its SwiGLU width solved to the hybrid's active count: difference "
        f"{100 * parameter_mismatch(p):.2f} %), MiniFusion full attention {p['full_attention']:,} "
        "(the hybrid's shape with every layer attention)."
    )
    if results.ops_per_token:
        ops = results.ops_per_token
        note += " ATen operations per decode step: " + ", ".join(
            f"{LABELS[m]} {ops[m]}" for m in MODELS if m in ops
        ) + "."
    return note


# ----------------------------------------------------------------------------------------------
# Its two sections of bench/RESULTS.md (decode speed, cache memory) and README headlines
# ----------------------------------------------------------------------------------------------
def _decode_results(data: Data) -> DecodeResults:
    return DecodeResults.from_dict(data)


def decode_table(per_device: PerDevice) -> str:
    cells: dict[str, dict[tuple[int, int, str], list[str]]] = {}
    for device, data in per_device.items():
        results = _decode_results(data)
        llama = {(s.batch_size, s.context): s.tokens_per_s
                 for s in results.speeds if s.model == "llama"}  # fmt: skip
        cells[device] = {
            (s.batch_size, s.context, s.model): [
                f"{s.tokens_per_s:,.1f}",
                _ratio(s.tokens_per_s, llama[(s.batch_size, s.context)]),
            ]
            for s in results.speeds
        }
    pairs = _sorted_union(
        per_device, lambda d: ((s["batch_size"], s["context"]) for s in d["speeds"])
    )
    keys = [(b, c, m) for b, c in pairs for m in MODELS]
    return grouped_table(
        "batch, context, model", ["tokens/s", "ratio to Llama"], cells, keys,
        label=lambda key: f"{key[0]}, {key[1]}, {LABELS[key[2]]}",
    )  # fmt: skip


def decode_reading(data: Data) -> str:
    results = _decode_results(data)
    by_key = {(s.batch_size, s.context, s.model): s.tokens_per_s for s in results.speeds}
    sentences = []
    for batch in results.batch_sizes():
        contexts = sorted({s.context for s in results.speeds if s.batch_size == batch})
        ratios = ", ".join(
            f"{by_key[(batch, c, 'hybrid')] / by_key[(batch, c, 'llama')]:.2f}× at {c}"
            for c in contexts
        )
        sentences.append(f"batch {batch}: the hybrid decodes at {ratios} Llama's speed")
    by_model = {p.model: p for p in results.prefills}
    if by_model:
        hybrid, llama = by_model["hybrid"], by_model["llama"]
        sentences.append(
            f"prefill of {hybrid.context} tokens takes {hybrid.seconds / llama.seconds:.2f}× "
            "Llama's time"
        )
    return "; ".join(sentences) + "."


def decode_detail(data: Data) -> str:
    results = _decode_results(data)
    parts = [parameter_note(results), format_speed_table(results)]
    if results.prefills:
        parts.append(format_prefill_table(results))
    return "\n\n".join(parts)


def cache_table(per_device: PerDevice) -> str:
    columns = ["hybrid MiB", "full attention MiB", "Llama MiB", "hybrid / Llama",
               "formula = measured"]  # fmt: skip
    cells: dict[str, dict[int, list[str]]] = {}
    for device, data in per_device.items():
        results = _decode_results(data)
        by_key = {(c.model, c.tokens): c for c in results.caches}
        rows = {}
        for tokens in sorted({c.tokens for c in results.caches}):
            row = [by_key[(m, tokens)] for m in MODELS]
            rows[tokens] = [f"{c.bytes / 2**20:.3f}" for c in row] + [
                _ratio(row[0].bytes, row[2].bytes),
                "yes" if all(c.bytes == c.formula_bytes for c in row) else "no",
            ]
        cells[device] = rows
    keys = _sorted_union(per_device, lambda d: (c["tokens"] for c in d["caches"]))
    return grouped_table("tokens", columns, cells, keys)


def cache_reading(data: Data) -> str:
    results = _decode_results(data)
    if not results.caches:
        return "not measured."
    n = max(c.tokens for c in results.caches)
    by_key = {(c.model, c.tokens): c.bytes for c in results.caches}
    hybrid, llama = by_key[("hybrid", n)], by_key[("llama", n)]
    return (
        f"after {n} tokens the hybrid cache holds {hybrid / 2**20:.2f} MiB, "
        f"{hybrid / llama:.2f}× Llama's {llama / 2**20:.2f} MiB."
    )


def cache_detail(data: Data) -> str:
    results = _decode_results(data)
    measured = format_cache_table(results) if results.caches else "not measured"
    return (
        f"{measured}\n\nThe cache formula of every preset (`MiniFusionConfig.cache_bytes`, "
        f"computed from the configs, fp32, batch 1):\n\n{preset_cache_table()}"
    )


def _headline_decode(data: Data) -> str:
    results = _decode_results(data)
    batch = min(results.batch_sizes())
    n = max(s.context for s in results.speeds if s.batch_size == batch)
    by_model = {s.model: s.tokens_per_s for s in results.speeds
                if s.context == n and s.batch_size == batch}  # fmt: skip
    return f"{by_model['hybrid'] / by_model['llama']:.2f}× (context {n}, batch {batch})"


def _headline_cache(data: Data) -> str | None:
    results = _decode_results(data)
    if not results.caches:
        return None
    n = max(c.tokens for c in results.caches)
    by_model = {c.model: c.bytes for c in results.caches if c.tokens == n}
    return f"{by_model['hybrid'] / by_model['llama']:.2f}× ({n} tokens)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.decode", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--contexts", type=positive_int, nargs="+", default=list(DEFAULT_CONTEXTS))
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=list(DEFAULT_BATCH_SIZES)
    )
    parser.add_argument(
        "--prefill-context", type=non_negative_int, default=DEFAULT_PREFILL_CONTEXT,
        help="prompt length whose prefill is timed (0: skip)",
    )  # fmt: skip
    parser.add_argument("--new-tokens", type=positive_int, default=DEFAULT_NEW_TOKENS)
    parser.add_argument("--cache-lengths", type=positive_int, nargs="*",
                        default=list(DEFAULT_CACHE_LENGTHS))
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    print(
        f"Greedy decode on {args.device}, preset {args.preset!r}, batch sizes "
        f"{args.batch_sizes}: {args.new_tokens} new tokens after each prompt length, best of "
        f"{args.repeats}; prefill of {args.prefill_context} tokens (batch 1); the cache read "
        "after 1 decode step."
    )
    started = time.perf_counter()
    results = run(
        args.preset,
        contexts=tuple(args.contexts),
        batch_sizes=tuple(args.batch_sizes),
        prefill_context=args.prefill_context or None,
        cache_lengths=tuple(args.cache_lengths),
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        device=args.device,
    )
    print(parameter_note(results))
    print(format_speed_table(results))
    if results.prefills:
        print(format_prefill_table(results))
    if results.caches:
        print(format_cache_table(results))
    print("The cache formula per preset (MiniFusionConfig.cache_bytes, fp32, batch 1):")
    print(preset_cache_table())
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
