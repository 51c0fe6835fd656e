"""An equal wall-clock training race: seven language models of about one size, the same recipe.

Every entry is trained from scratch by one shared loop, in its own fresh Python process, on the
same batches, for the same number of *seconds* — then scored on held-out text in bits per
character. A slow model takes fewer steps in the time; a fast one more. Entries (``--models``):

* ``hybrid`` — MiniFusion's ``tiny`` preset as shipped (``configs/tiny.yaml``, read at run time,
  so the race follows the preset);
* ``attention`` / ``mamba`` — the same preset with every layer attention / every layer Mamba,
  each followed by a dense feed-forward block (width, heads, window, Mamba settings unchanged;
  the attention twin sets the parameter target of the others below);
* ``llama``, ``gpt2``, ``falcon_h1``, ``mamba2`` — transformers' ``LlamaForCausalLM``,
  ``GPT2LMHeadModel``, ``FalconH1ForCausalLM`` (attention ∥ Mamba-2 in every layer) and
  ``Mamba2ForCausalLM`` with the preset's width, heads, vocabulary and tied embeddings; one
  integer width each (feed-forward width; Mamba-2's layer count) is solved so that the parameter
  count is the closest to the attention twin's. Without ``mamba_ssm`` / ``causal_conv1d`` the
  Mamba-2 models run transformers' PyTorch path (the table says so).

The table gives every entry's parameter count and its gap to the attention twin (``tiny``'s
Mamba layers run at expansion 1 without a feed-forward block, so the shipped hybrid is about a
fifth smaller than its twin; ``tiny-parallel``'s layers, which hold both mixers, are larger),
and how many epochs of the training split its steps covered: past one, the validation score
rewards generalising as well as learning fast, and a larger model can end with the lower
training loss and the higher validation bpc.

**Recipe** (the same for every entry; flags change it for all alike): AdamW (betas 0.9/0.99,
weight decay 0.1 on matrices, none on norms, biases, embeddings and Mamba's ``A_log``/``D`` —
the project's :func:`~minifusion.training.parameter_groups`), peak lr ``--lr``, multiplied by a
50-step linear warm-up ramp and by a cosine over the *fraction of the time budget spent* down to
10 % (:func:`learning_rate`), global-norm clipping at 1.0, ``--batch-size`` sequences of
``--seq-len`` tokens drawn uniformly at random from the training split (``--seed`` fixes them and
the initial weights), ``--threads`` CPU threads. The clock counts training steps only
(forward, backward, clipping, optimizer) — not drawing the batch, building the model, one
untimed warm-up pass that changes no weight (:func:`warm_up`), or scoring.

**Data**: the default corpus (Shakespeare's 42 works) with exactly two whole works held out for
validation (:func:`minifusion.data.split_documents` with seed 0: *Love's Labour's Lost* and
*Romeo and Juliet*), one byte-level BPE tokenizer of the preset's vocabulary (4096) trained on the
other 40, tokens prepared once and cached in ``bench/results/race_data/`` before any worker
starts. **Score**: every complete ``--seq-len`` block of the validation split (~95 k tokens),
bits per character = total cross-entropy in bits ÷ characters of the scored text
(:func:`minifusion.training.evaluate`). ``--quick`` scores 32 blocks spread evenly over it.

Times are wall-clock, so run it on an otherwise idle machine: each entry records the load
average at the end of its training, and the table warns when other work shared the CPU. The
host's own speed drifts too (10–25 % for minutes at a time on a virtual machine, invisible to
the load average), so the entries' processes **take turns** (:mod:`bench.turns`): all start,
then train ``--turn-seconds`` (10) of their budget at a time, round-robin, one at a time, until
each has spent its budget — a slow stretch then slows every entry alike, not whichever one
happened to be running. ``--turn-seconds 0`` runs them one after another instead.
Results go to ``bench/results/race.json``, one record per (seconds, lr, batch size, sequence
length, seed), so runs with other budgets coexist; ``make bench`` runs the default race and puts
every saved record in ``bench/RESULTS.md`` (:func:`markdown`).

:func:`race_table` renders its section of ``bench/RESULTS.md`` (every saved record, under
its device) and :func:`_headline_race` its row of the README's headline table, from the
data :mod:`bench.report` stores.

    python -m bench.race                          # the full race: 7 × 240 s (~35 min on 2 cores)
    python -m bench.race --seconds 480 --models hybrid attention llama
    python -m bench.race --lr 3e-3                # another record next to the default one
    python -m bench.race --quick                  # 3 s per entry, 32 validation blocks, not saved
    python -m bench.race --show                   # print the saved records as Markdown
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from minifusion.config import MiniFusionConfig
from minifusion.corpus import BUILT_IN_CORPORA
from minifusion.data import _datasets_progress, load_documents, prepare_data, split_documents
from minifusion.host_memory import reuse_freed_memory
from minifusion.model import MiniFusionForCausalLM
from minifusion.token_files import TokenFile
from minifusion.tokenizer import load_tokenizer
from minifusion.training import (
    BatchStream,
    EvalResult,
    ValidationSet,
    compute_loss,
    evaluate,
    parameter_groups,
)

from . import RESULTS_DIR
from .decode import matched_llama_config
from .stats import mean_and_spread, wins_in_every_seed
from .tables import Data, PerDevice, _device_blocks
from .timing import machine_description
from .turns import TurnTaker, run_in_turns

ROOT = Path(__file__).resolve().parents[1]
RESULTS_FILE = RESULTS_DIR / "race.json"
DATA_DIR = RESULTS_DIR / "race_data"  # git-ignored cache of tokenizer + tokens
PRESET = "tiny"
CORPUS = "shakespeare"
CORPORA = BUILT_IN_CORPORA  # what --corpus accepts
VALIDATION_WORKS = 2  # whole documents held out for validation ...
HELD_OUT = {"python-code": 43}  # ... or, for these corpora, this many (3 % of SymPy's modules)
SPLIT_SEED = 0  # which works: fixed, independent of --seed
QUICK_SECONDS = 3.0
QUICK_EVAL_BLOCKS = 32
PROGRESS_EVERY_S = 30.0  # a worker's progress line, in training seconds
TURN_SECONDS = 10.0  # training seconds per turn when the entries take turns (bench/turns.py)
LOSS_WINDOW = 10  # the reported train loss: the mean of the last steps' losses
RECORD_KEY = ("seconds", "lr", "batch_size", "seq_len", "seed")
_QUICK = {"seconds": QUICK_SECONDS, "eval_blocks": QUICK_EVAL_BLOCKS}  # what --quick changes


# ==============================================================================================
# Settings and the learning-rate schedule
# ==============================================================================================
@dataclass(frozen=True)
class RaceSettings:
    """The recipe every entry of one race gets (saved with its results)."""

    seconds: float = 240.0
    lr: float = 1e-3
    batch_size: int = 16
    seq_len: int = 128
    threads: int = 2
    seed: int = 0
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    eval_blocks: int | None = None  # validation blocks scored; None: all of them
    turn_seconds: float = TURN_SECONDS  # entries take turns of this much training; 0: one by one
    reuse_freed_memory: bool = True  # every worker: minifusion.host_memory.reuse_freed_memory

    def __post_init__(self) -> None:
        """Refuse a recipe no race can run, naming the flag and what it takes (a zero budget or
        batch would otherwise fail inside every worker, after the data and models were built)."""
        rules = {  # setting: (holds, what it must be, what it means)
            "seconds": (0 < self.seconds < math.inf, "finite and > 0", "training seconds each"),
            "lr": (0 < self.lr < math.inf, "finite and > 0", "the peak learning rate, e.g. 1e-3"),
            "batch_size": (self.batch_size >= 1, "≥ 1", "sequences per step"),
            "seq_len": (self.seq_len >= 1, "≥ 1", "tokens per sequence"),
            "threads": (self.threads >= 1, "≥ 1", "torch threads per worker"),
            "turn_seconds": (0 <= self.turn_seconds < math.inf, "finite and ≥ 0",
                             "0: one after another"),
            "eval_blocks": (self.eval_blocks is None or self.eval_blocks >= 1, "≥ 1 or None",
                            "validation blocks scored; None: all"),
            "warmup_steps": (self.warmup_steps >= 0, "≥ 0", "steps of linear warm-up"),
            "min_lr_ratio": (0 <= self.min_lr_ratio <= 1, "in [0, 1]", "the cosine's floor"),
            "grad_clip": (self.grad_clip >= 0, "≥ 0", "0: no clipping"),
        }  # fmt: skip
        for name, (holds, rule, meaning) in rules.items():
            if not holds:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} must be {rule}, not {getattr(self, name)} ({meaning}).")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "betas": list(self.betas)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RaceSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        before = {"turn_seconds": 0.0, "reuse_freed_memory": False}  # records older than these
        values = {**before, **{k: v for k, v in values.items() if k in known}}
        if "betas" in values:
            values["betas"] = tuple(values["betas"])
        return cls(**values)


def learning_rate(step: int, elapsed: float, settings: RaceSettings) -> float:
    """The learning rate of optimizer step ``step`` (0-based) after ``elapsed`` training seconds.

    ``lr × min(1, (step + 1) / warmup_steps) × (m + (1 − m) · ½ (1 + cos(π f)))`` with
    ``f = min(elapsed / seconds, 1)`` and ``m = min_lr_ratio``: a linear warm-up over the first
    steps, then (the cosine is ≈ 1 while warming up) a cosine over the time budget, so a fast and
    a slow model both reach 10 % of the peak when the time is up.
    """
    warmup = min(1.0, (step + 1) / settings.warmup_steps) if settings.warmup_steps > 0 else 1.0
    fraction = min(elapsed / settings.seconds, 1.0)
    cosine = 0.5 * (1 + math.cos(math.pi * fraction))
    return settings.lr * warmup * (settings.min_lr_ratio + (1 - settings.min_lr_ratio) * cosine)


# ==============================================================================================
# The entries
# ==============================================================================================
Builder = Callable[[MiniFusionConfig, RaceSettings], tuple[nn.Module, str]]


@dataclass(frozen=True)
class Entry:
    """One runner: its name on the command line, what it is, and how to build it."""

    name: str
    description: str
    build: Builder  # (preset config, settings) → (model, its sizes in a few words)
    needs: tuple[str, ...] = ()  # kernel packages it would use; without them: the PyTorch path


def preset_config() -> MiniFusionConfig:
    """The ``tiny`` preset as it is in ``configs/`` now."""
    return MiniFusionConfig.from_preset(PRESET)


def minifusion_config(mixer: str, base: MiniFusionConfig) -> MiniFusionConfig:
    """``base`` itself for ``"hybrid"``; else ``base`` with every layer ``mixer`` followed by a
    dense feed-forward block — a plain transformer (or Mamba stack), whatever layer plan the
    preset has (a preset whose Mamba layers skip the feed-forward does not make its twins
    smaller). The attention twin has the preset's global heads in every layer, whichever layers
    the preset gives them to (the stronger twin at a short context)."""
    if mixer == "hybrid":
        return base
    layers = base.num_hidden_layers
    return base.replaced(mixer_types=[mixer] * layers, ffn_types=["dense"] * layers,
                         global_attention_layers=None)  # fmt: skip


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (a tied embedding and head count once)."""
    return sum(p.numel() for p in model.parameters())


def _meta_count(make: Callable[[], nn.Module]) -> int:
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        return count_parameters(make())


def twin_parameters(base: MiniFusionConfig) -> int:
    """Parameters of the attention twin: the target of the transformers entries."""
    return _meta_count(lambda: MiniFusionForCausalLM(minifusion_config("attention", base)))


def solve_width(make: Callable[[int], nn.Module], target: int) -> int:
    """The integer ``w ≥ 1`` whose ``make(w)`` has the parameter count closest to ``target``.

    Counts are linear in the widths used here (a feed-forward width, a number of layers), so two
    sizes give the slope.
    """
    first, second = _meta_count(lambda: make(1)), _meta_count(lambda: make(2))
    return max(1, round(1 + (target - first) / (second - first)))


def layer_plan(config: MiniFusionConfig) -> str:
    """The layer stack in a few characters: ``"A-M-A-M, Mamba expand 1, FFN 384"`` (A attention,
    M Mamba, A∥M a parallel hybrid layer; a layer without feed-forward block is marked ``*``),
    naming QK-norm and the output gate when the attention layers have them."""
    letters = {"attention": "A", "mamba": "M", "hybrid": "A∥M"}
    plan = "-".join(
        letters[mixer] + ("*" if ffn == "none" else "")
        for mixer, ffn in zip(config.mixer_types, config.ffn_types)
    )
    parts = [plan + (" (* no FFN)" if "none" in config.ffn_types else "")]
    if any(m in ("attention", "hybrid") for m in config.mixer_types):
        attention = [name for name, on in (("QK-norm", config.attention_qk_norm),
                     ("output gate", config.attention_output_gate)) if on]  # fmt: skip
        if attention:
            parts.append("attention with " + " + ".join(attention))
    if any(m in ("mamba", "hybrid") for m in config.mixer_types):
        parts.append(f"Mamba expand {config.mamba_expand}")
    return ", ".join([*parts, f"FFN {config.intermediate_size}"])


def _minifusion(mixer: str) -> Builder:
    def build(base: MiniFusionConfig, settings: RaceSettings) -> tuple[nn.Module, str]:
        config = minifusion_config(mixer, base)
        return MiniFusionForCausalLM(config), layer_plan(config)

    return build


def _sized(make: Callable[[MiniFusionConfig, RaceSettings, int], nn.Module], knob: str) -> Builder:
    """A transformers entry whose ``knob`` is solved to the attention twin's parameter count."""

    def build(base: MiniFusionConfig, settings: RaceSettings) -> tuple[nn.Module, str]:
        width = solve_width(lambda w: make(base, settings, w), twin_parameters(base))
        return make(base, settings, width), f"{knob} {width}"

    return build


def _shared(base: MiniFusionConfig) -> dict[str, Any]:
    """Settings every transformers config takes from the preset (no cache while training)."""
    return dict(
        vocab_size=base.vocab_size,
        tie_word_embeddings=base.tie_word_embeddings,
        initializer_range=base.initializer_range,
        use_cache=False,
        bos_token_id=base.bos_token_id,
        eos_token_id=base.eos_token_id,
        pad_token_id=base.pad_token_id,
    )


def _llama(base: MiniFusionConfig, settings: RaceSettings, intermediate: int) -> nn.Module:
    from transformers import LlamaForCausalLM

    config = matched_llama_config(base.replaced(intermediate_size=intermediate))
    for key, value in _shared(base).items():
        setattr(config, key, value)
    return LlamaForCausalLM(config)


def _gpt2(base: MiniFusionConfig, settings: RaceSettings, inner: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_embd=base.hidden_size,
        n_layer=base.num_hidden_layers,
        n_head=base.num_attention_heads,
        n_positions=settings.seq_len,  # learned positions: exactly the ones used
        n_inner=inner,
        resid_pdrop=0.0,  # no dropout, like every other entry
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **_shared(base),
    )
    return GPT2LMHeadModel(config)


def _mamba2_heads(base: MiniFusionConfig) -> dict[str, int]:
    """Mamba-2 widths from the preset: inner width (expansion × hidden), heads, head width."""
    inner = base.mamba_expand * base.hidden_size
    return {"inner": inner, "heads": inner // base.head_dim, "head_dim": base.head_dim}


def _falcon_h1(base: MiniFusionConfig, settings: RaceSettings, intermediate: int) -> nn.Module:
    from transformers import FalconH1Config, FalconH1ForCausalLM

    mamba = _mamba2_heads(base)
    config = FalconH1Config(
        hidden_size=base.hidden_size,
        intermediate_size=intermediate,
        num_hidden_layers=base.num_hidden_layers,
        num_attention_heads=base.num_attention_heads,
        num_key_value_heads=base.num_key_value_heads,
        max_position_embeddings=base.max_position_embeddings,
        rms_norm_eps=base.rms_norm_eps,
        mamba_d_ssm=mamba["inner"],
        mamba_n_heads=mamba["heads"],
        mamba_d_state=base.mamba_d_state,
        mamba_d_conv=base.mamba_d_conv,
        mamba_n_groups=1,
        mamba_chunk_size=base.mamba_chunk_size,
        **_shared(base),
    )
    return FalconH1ForCausalLM(config)


def _mamba2(base: MiniFusionConfig, settings: RaceSettings, layers: int) -> nn.Module:
    from transformers import Mamba2Config, Mamba2ForCausalLM

    mamba = _mamba2_heads(base)
    config = Mamba2Config(
        hidden_size=base.hidden_size,
        num_hidden_layers=layers,
        num_heads=mamba["heads"],
        head_dim=mamba["head_dim"],
        expand=base.mamba_expand,
        state_size=base.mamba_d_state,
        conv_kernel=base.mamba_d_conv,
        n_groups=1,
        chunk_size=base.mamba_chunk_size,
        layer_norm_epsilon=base.rms_norm_eps,
        **_shared(base),
    )
    return Mamba2ForCausalLM(config)


MAMBA_KERNELS = ("mamba_ssm", "causal_conv1d")
ENTRIES: dict[str, Entry] = {
    entry.name: entry
    for entry in (
        Entry("hybrid", "MiniFusion `tiny` as shipped (hybrid)", _minifusion("hybrid")),
        Entry("attention", "MiniFusion `tiny`, attention only", _minifusion("attention")),
        Entry("mamba", "MiniFusion `tiny`, Mamba only", _minifusion("mamba")),
        Entry("llama", "transformers LlamaForCausalLM", _sized(_llama, "FFN")),
        Entry("gpt2", "transformers GPT2LMHeadModel", _sized(_gpt2, "FFN")),
        Entry("falcon_h1", "transformers FalconH1ForCausalLM", _sized(_falcon_h1, "FFN"),
              MAMBA_KERNELS),
        Entry("mamba2", "transformers Mamba2ForCausalLM", _sized(_mamba2, "layers"),
              MAMBA_KERNELS),
    )
}  # fmt: skip


def entry_parameters(names: Sequence[str] = tuple(ENTRIES)) -> dict[str, int]:
    """Each entry's parameter count at the default settings (built on the meta device)."""
    base, settings = preset_config(), RaceSettings()
    return {name: _meta_count(lambda n=name: ENTRIES[n].build(base, settings)[0]) for name in names}


def kernel_note(entry: Entry) -> str:
    """``""``, or which missing kernel packages send ``entry`` down its PyTorch path."""
    missing = [p for p in entry.needs if importlib.util.find_spec(p) is None]
    return f"PyTorch path ({', '.join(missing)} not installed)" if missing else ""


# ==============================================================================================
# One entry: build, train for the time, score (what a worker process runs)
# ==============================================================================================
@dataclass
class TrainLog:
    """What the loop did: steps, tokens, training seconds, the loss of every step (nats)."""

    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    warm_up_seconds: float = 0.0  # the untimed first pass (where torch.compile compiles)

    @property
    def final_loss(self) -> float:
        last = self.losses[-LOSS_WINDOW:]
        return sum(last) / len(last) if last else math.nan


def race_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor):
    """``(objective, next-token cross-entropy)``: a MiniFusion model adds its auxiliary losses
    (its gate terms, as in ``make train``); a transformers model has none."""
    if isinstance(model, MiniFusionForCausalLM):
        parts = compute_loss(model, inputs, targets)
        return parts.total, parts.lm
    logits = model(input_ids=inputs).logits
    lm = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    return lm, lm


def build_optimizer(model: nn.Module, settings: RaceSettings) -> torch.optim.AdamW:
    groups = parameter_groups(model, settings.weight_decay)
    return torch.optim.AdamW(groups, lr=settings.lr, betas=settings.betas)


def warm_up(model: nn.Module, batches: BatchStream) -> None:
    """One untimed forward + backward on the first batch, its gradients thrown away.

    A fresh process's first pass pays one-time costs (lazy initialisation, the allocator's
    first blocks, kernel look-ups: seconds for transformers' Mamba-2 path) that are no part of
    training speed. The weights do not change, and training starts from the first batch again.
    """
    inputs, targets = batches.next_batch()
    race_loss(model, inputs, targets)[0].backward()
    model.zero_grad(set_to_none=True)
    batches.position = 0


def train_for_budget(
    model: nn.Module,
    batches: BatchStream,
    settings: RaceSettings,
    on_progress: Callable[[TrainLog], None] | None = None,
    take_turn: Callable[[float], None] | None = None,
) -> TrainLog:
    """Train until ``settings.seconds`` of training steps have passed; returns the log.

    ``take_turn`` (a :class:`bench.turns.TurnTaker`) is called after every step, outside the
    timed part, with the training seconds so far: it pauses the process while other entries
    take their turns."""
    optimizer = build_optimizer(model, settings)
    log, next_progress = TrainLog(), PROGRESS_EVERY_S
    model.train()
    start = time.perf_counter()
    warm_up(model, batches)
    log.warm_up_seconds = time.perf_counter() - start
    while log.seconds < settings.seconds:
        inputs, targets = batches.next_batch()  # drawing the batch is not timed
        start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(log.steps, log.seconds, settings)
        objective, lm = race_loss(model, inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        loss = float(lm.detach())
        log.seconds += time.perf_counter() - start
        log.steps, log.tokens = log.steps + 1, log.tokens + inputs.numel()
        log.losses.append(loss)
        if not math.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss at step {log.steps}")
        if on_progress is not None and log.seconds >= next_progress:
            on_progress(log)
            next_progress += PROGRESS_EVERY_S
        if take_turn is not None and log.seconds < settings.seconds:
            take_turn(log.seconds)
    return log


def validation_bpc(
    model: nn.Module, validation: ValidationSet, settings: RaceSettings
) -> EvalResult:
    """Loss and bits per character over ``settings.eval_blocks`` blocks spread evenly over the
    validation split (every block for ``None``): total bits ÷ characters of the scored text."""
    return evaluate(
        model, validation, batch_size=settings.batch_size, max_blocks=settings.eval_blocks
    )


def run_entry(
    name: str,
    settings: RaceSettings,
    data: dict[str, str],
    overrides: dict[str, Any] | None = None,
    take_turn: Callable[[float], None] | None = None,
    label: str | None = None,
) -> dict[str, Any]:
    """Build, train and score one entry in this process; its result as JSON-able data.
    ``label`` names it in the progress lines (default ``name``: a design or a copy races as
    the ``hybrid`` entry, and in turns the lines of all entries interleave).

    ``overrides`` change the preset's model settings first (``bench.designs`` races design
    variants of the hybrid this way, ``bench.ablation`` techniques; the race itself passes
    none). The key ``"compile": true`` among them compiles the model (``nn.Module.compile``)
    instead: the compilation happens in the untimed warm-up pass."""
    entry, base = ENTRIES[name], preset_config()
    overrides = dict(overrides or {})
    compile_model = bool(overrides.pop("compile", False))
    if overrides:
        base = base.replaced(**overrides)
    tokenizer = load_tokenizer(data["tokenizer"])
    if len(tokenizer) > base.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens > vocab_size {base.vocab_size}")
    torch.manual_seed(settings.seed)
    model, sizes = entry.build(base, settings)
    if compile_model:
        model.compile()
    batches = BatchStream(data["train"], settings.seq_len, settings.batch_size, seed=settings.seed)

    def progress(log: TrainLog) -> None:
        print(f"[race]   {label or name}: {log.steps:,} steps, {log.seconds:.0f} s, "
              f"loss {log.losses[-1]:.3f}", flush=True)  # fmt: skip

    log = train_for_budget(model, batches, settings, progress, take_turn)
    load = os.getloadavg()[0]  # the last minute of training: was the CPU shared?
    score = validation_bpc(model, ValidationSet(data["val"], settings.seq_len, tokenizer), settings)
    return {
        "model": entry.description,
        "sizes": sizes,
        "note": kernel_note(entry),
        "params": count_parameters(model),
        "steps": log.steps,
        "tokens": log.tokens,
        "train_seconds": log.seconds,
        "warm_up_seconds": log.warm_up_seconds,
        "tokens_per_s": log.tokens / log.seconds,
        "train_loss": log.final_loss,
        "val_loss": score.loss,
        "val_bpc": score.bpc,
        "val_tokens": score.tokens,
        "val_characters": score.characters,
        "load_average": load,
    }


def _worker(
    name: str,
    settings: RaceSettings,
    data: dict[str, str],
    out: str | Path,
    overrides: dict[str, Any] | None = None,
    turns: TurnTaker | None = None,
    label: str | None = None,
) -> int:
    """One entry's result — or its error: the race goes on — to ``out`` as JSON (then, taking
    turns, tell the race it is done)."""
    try:
        result = run_entry(name, settings, data, overrides, turns, label)
    except Exception as error:
        traceback.print_exc()
        result = {"error": f"{type(error).__name__}: {error}"}
    Path(out).write_text(json.dumps(result), encoding="utf-8")
    if turns is not None:
        turns.done()
    return 0


def _worker_main(args: argparse.Namespace) -> int:
    """``--worker``: a fresh process that :func:`run_workers` starts."""
    import transformers

    transformers.logging.set_verbosity_error()  # the PyTorch-path notice goes in the table
    settings = RaceSettings.from_dict(json.loads(args.settings_json))
    torch.set_num_threads(settings.threads)
    if settings.reuse_freed_memory:
        reuse_freed_memory()  # where there is no glibc: nothing to change, the race runs as is
    overrides = json.loads(args.overrides_json) if args.overrides_json else None
    turns = None
    if args.control_fd is not None:  # taking turns: the first one starts after every import
        turns = TurnTaker.from_fd(settings.turn_seconds, int(args.control_fd))
        turns.ready()
    data = json.loads(args.data_json)
    return _worker(args.worker, settings, data, args.out, overrides, turns, args.label)


# ==============================================================================================
# The race: data once, then one fresh process per entry
# ==============================================================================================
def data_dir_for(corpus: str) -> Path:
    """Where a corpus's race data is cached: :data:`DATA_DIR` for the default one, a sibling
    folder named after it for the others (each corpus keeps its own tokenizer)."""
    return DATA_DIR if corpus == CORPUS else DATA_DIR.with_name(f"{DATA_DIR.name}_{corpus}")


def prepare_race_data(
    corpus: str = CORPUS, data_dir: str | Path | None = None, vocab_size: int | None = None
) -> tuple[dict[str, str], list[str]]:
    """Tokenizer and token files with :data:`VALIDATION_WORKS` whole works held out (or the
    corpus's count in :data:`HELD_OUT`), cached in ``data_dir`` (default
    :func:`data_dir_for`); returns their paths and the held-out documents' names."""
    vocab_size = vocab_size or preset_config().vocab_size
    data_dir = data_dir_for(corpus) if data_dir is None else data_dir
    held_out_count = HELD_OUT.get(corpus, VALIDATION_WORKS)
    with _datasets_progress(False):
        documents = load_documents(corpus)
    fraction = held_out_count / len(documents)  # split_documents rounds fraction × count
    _, held_out = split_documents(documents, val_fraction=fraction, seed=SPLIT_SEED)
    prepared = prepare_data(data_dir, source=corpus, vocab_size=vocab_size, val_fraction=fraction,
                            seed=SPLIT_SEED, progress=False)  # fmt: skip
    if prepared.val.num_documents != held_out_count:
        raise ValueError(f"{corpus}: {prepared.val.num_documents} documents held out, not "
                         f"{held_out_count} (the corpus has {len(documents)}).")  # fmt: skip
    paths = {"train": prepared.train_file, "val": prepared.val_file,
             "tokenizer": prepared.tokenizer_dir}  # fmt: skip
    return {key: str(path) for key, path in paths.items()}, list(held_out["source"])


Job = tuple[str, dict[str, Any] | None]  # an entry's name and the preset changes it races with
WORKER_MARGIN_S = 900.0  # a worker's time beyond its training: imports, building, scoring


def _worker_command(
    label: str, job: Job, settings: RaceSettings, data: dict[str, str], out: Path
) -> list[str]:
    name, overrides = job
    return [
        sys.executable, "-m", f"{__package__ or 'bench'}.race", "--worker", name,
        "--settings-json", json.dumps(settings.to_dict()), "--data-json", json.dumps(data),
        "--out", str(out), "--overrides-json", json.dumps(overrides or {}), "--label", label,
    ]  # fmt: skip


def _worker_result(out: Path, code: int | None, timeout: float) -> dict[str, Any]:
    """What a finished worker wrote, or why there is nothing (``code`` ``None``: it was killed
    after ``timeout`` seconds)."""
    if out.exists():
        return json.loads(out.read_text(encoding="utf-8"))
    if code is None:
        return {"error": f"timed out after {timeout:.0f} s"}
    return {"error": f"the worker exited with code {code} and no result"}


def run_workers(
    jobs: dict[str, Job],
    settings: RaceSettings,
    data: dict[str, str],
    on_result: Callable[[str, dict[str, Any]], None] = lambda label, result: None,
) -> dict[str, dict[str, Any]]:
    """Every job (a label → its entry and preset changes) in a fresh ``python -m bench.race
    --worker`` process; their results (or errors) by label, ``on_result`` called as each ends.

    With ``settings.turn_seconds`` > 0 and two jobs or more, the processes take turns on the CPU
    (:mod:`bench.turns`: a slow stretch of the host then slows them all alike); else each runs
    start to end, one after another."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    results: dict[str, dict[str, Any]] = {}
    labels = list(jobs)
    in_turns = settings.turn_seconds > 0 and len(jobs) > 1
    # one process start to end, or one turn of it (building, warm-up, scoring included)
    timeout = (settings.turn_seconds if in_turns else 2 * settings.seconds) + WORKER_MARGIN_S
    with tempfile.TemporaryDirectory() as folder:
        outs = {label: Path(folder) / f"{index}.json" for index, label in enumerate(labels)}
        commands = [_worker_command(label, jobs[label], settings, data, outs[label])
                    for label in labels]  # fmt: skip

        def collect(index: int, code: int | None) -> None:
            label = labels[index]
            results[label] = _worker_result(outs[label], code, timeout)
            on_result(label, results[label])

        if in_turns:
            run_in_turns(commands, settings.turn_seconds, cwd=ROOT, env=env, timeout=timeout,
                         on_finish=collect)  # fmt: skip
        else:
            for index, command in enumerate(commands):
                try:
                    code = subprocess.run(command, cwd=ROOT, env=env, timeout=timeout).returncode
                except subprocess.TimeoutExpired:
                    code = None
                collect(index, code)
    return {label: results[label] for label in labels}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def run(
    models: Sequence[str] = tuple(ENTRIES),
    settings: RaceSettings | None = None,
    *,
    corpus: str = CORPUS,
    data_dir: str | Path | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the race over ``models`` (default settings: :class:`RaceSettings`); returns its
    record (see :func:`save_record`)."""
    settings = RaceSettings() if settings is None else settings
    data, works = prepare_race_data(corpus, data_dir)
    scored = "every block" if settings.eval_blocks is None else f"{settings.eval_blocks} blocks"
    echo(f"[race] {len(models)} entries × {settings.seconds:g} s each, lr {settings.lr:g}, "
         f"batch {settings.batch_size} × {settings.seq_len}, {settings.threads} threads, seed "
         f"{settings.seed}, {schedule_text(settings.to_dict(), len(models))}; validation: "
         f"{', '.join(works)} ({scored})")  # fmt: skip

    def finished(name: str, result: dict[str, Any]) -> None:
        result["date"] = _now()
        echo(entry_line(name, result))

    jobs = {name: (name, None) for name in models}
    entries = run_workers(jobs, settings, data, finished)
    return race_record(settings, works, entries, design=current_design(),
                       **_data_fields(corpus, data))  # fmt: skip


def _data_fields(corpus: str, data: dict[str, str]) -> dict[str, Any]:
    """What a record keeps about its data: the corpus (part of the record's key) and the training
    split's size in tokens (for the tables' epochs column)."""
    return {"corpus": corpus, "train_tokens": len(TokenFile(data["train"]))}


def race_record(
    settings: RaceSettings, works: list[str], entries: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    """One run's record: its settings, when and where it ran, the held-out works, the entries."""
    return {
        "settings": settings.to_dict(),
        "date": _now(),
        "machine": machine_description(torch.device("cpu")),
        "cores": len(os.sched_getaffinity(0)),
        "preset": PRESET,
        **extra,
        "validation": {"works": works, "blocks": settings.eval_blocks or "all"},
        "entries": entries,
    }


def run_variants(
    tag: str,
    variants: dict[str, tuple[dict[str, Any], dict[str, Any]]],
    settings: RaceSettings,
    *,
    corpus: str = CORPUS,
    data_dir: str | Path | None = None,
    echo: Callable[[str], None] = print,
    design: str | None = None,
) -> dict[str, Any]:
    """Race variants of the preset as the ``hybrid`` entry: ``variants`` maps a name to
    ``(overrides, fields added to its result)``. ``bench.designs`` and ``bench.ablation`` run
    this; ``tag`` labels their lines (``[designs]``). Returns the record, as :func:`run` does,
    with ``design`` (the base the variants change, :func:`hybrid_design`) when given."""
    data, works = prepare_race_data(corpus, data_dir)
    echo(f"[{tag}] {len(variants)} variants × {settings.seconds:g} s, seed {settings.seed}, lr "
         f"{settings.lr:g}, batch {settings.batch_size} × {settings.seq_len}, "
         f"{schedule_text(settings.to_dict(), len(variants))}; validation: "
         f"{held_out_text(works)}")  # fmt: skip

    def finished(name: str, result: dict[str, Any]) -> None:
        result.update(date=_now(), **variants[name][1])
        echo(entry_line(name, result).replace("[race]", f"[{tag}]"))

    jobs = {name: ("hybrid", overrides) for name, (overrides, _) in variants.items()}
    entries = run_workers(jobs, settings, data, finished)
    named = {} if design is None else {"design": design}
    return race_record(settings, works, entries, **named, **_data_fields(corpus, data))


def entry_line(name: str, result: dict[str, Any]) -> str:
    """The line printed when an entry finishes."""
    if "error" in result:
        return f"[race] {name:<10} FAILED: {result['error']}"
    return (
        f"[race] {name:<10} {result['params']:>10,} params {result['steps']:>6,} steps "
        f"{result['tokens_per_s']:>8,.0f} tok/s  train loss {result['train_loss']:.3f}  "
        f"val bpc {result['val_bpc']:.3f}"
    )


# ==============================================================================================
# Saved records and their Markdown
# ==============================================================================================
def record_key(record: dict[str, Any]) -> tuple:
    """What makes two records the same race: the corpus, then :data:`RECORD_KEY` of their
    settings."""
    return (record.get("corpus", CORPUS), *(record["settings"][k] for k in RECORD_KEY))


def load_records(path: str | Path = RESULTS_FILE) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return json.loads(path.read_text(encoding="utf-8"))["records"]


def hybrid_design(record: dict[str, Any]) -> str | None:
    """The layer plan of the ``tiny`` a record raced (:func:`layer_plan`: its ``design``, or in
    records from before that field its hybrid entry's ``sizes``), or ``None`` when neither is
    there. The twins and the transformers entries are built from that preset too, so records of
    two designs are two different races."""
    return record.get("design") or record["entries"].get("hybrid", {}).get("sizes")


def current_design() -> str:
    """The layer plan of ``tiny`` as ``configs/`` has it now: what a rerun races."""
    return layer_plan(preset_config())


def raced_today(record: dict[str, Any]) -> bool:
    """Whether ``record`` raced ``tiny`` as ``configs/`` has it now (:func:`hybrid_design`); a
    record that cannot tell counts as an earlier one."""
    return hybrid_design(record) == current_design()


class MeasuredAs(NamedTuple):
    """Where and how a record's entries were timed, and of which ``tiny``."""

    machine: str | None  # CPU and PyTorch
    turn_seconds: float  # 0: one after another (and records from before turns)
    reuse_freed_memory: bool  # False in records from before that setting
    design: str | None  # :func:`hybrid_design`


def _measured_as(record: dict[str, Any]) -> MeasuredAs:
    settings = record["settings"]
    return MeasuredAs(record.get("machine"), settings.get("turn_seconds", 0.0),
                      settings.get("reuse_freed_memory", False), hybrid_design(record))  # fmt: skip


def _comparable(old: MeasuredAs, new: MeasuredAs) -> bool:
    """The same machine, schedule and memory handling, and the same ``tiny`` where both say
    which (a record without a hybrid entry from before the ``design`` field cannot tell)."""
    same_tiny = None in (old.design, new.design) or old.design == new.design
    return old._replace(design=None) == new._replace(design=None) and same_tiny


def save_record(
    record: dict[str, Any],
    path: str | Path = RESULTS_FILE,
    benchmark: str = "race",
    echo: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Add ``record`` to the file: it replaces the record with the same key, keeping that one's
    entries this run did not race (a ``--models`` subset updates only those) — but only when both
    were measured alike: on the same machine (CPU and PyTorch), in the same schedule (in turns
    or one after another) and with the same handling of freed memory. Entries timed otherwise
    are not comparable in speed, nor in score at a fixed time budget, so they are dropped
    (``echo`` names them). A single entry is not added to a record whose entries took turns: it
    trained with no other process beside it, faster than it would have among them; the file is
    then left as it was (``echo`` says how to race it). Returns all the records (:func:`saved`
    tells whether ``record`` is among them)."""
    records = load_records(path)
    old = next((r for r in records if record_key(r) == record_key(record)), None)
    if old is not None:
        not_raced = sorted(set(old["entries"]) - set(record["entries"]))
        was, now = _measured_as(old), _measured_as(record)
        if _comparable(was, now) and not_raced and len(record["entries"]) == 1 and now.turn_seconds > 0:
            (alone,) = record["entries"]
            echo(f"[{benchmark}] not saved: {alone} trained alone, but the saved record's entries "
                 f"took turns ({', '.join(not_raced)}), so its tokens/s and its score at this budget "
                 f"are not comparable with theirs; race it beside one of them (e.g. {alone} "
                 f"{not_raced[0]}) to add it")  # fmt: skip
            return records
        records.remove(old)
        if _comparable(was, now):
            record = {**record, "entries": {**old["entries"], **record["entries"]}}
        elif not_raced:
            if was.machine != now.machine:
                how = f"on another machine ({was.machine})"
            elif was.turn_seconds != now.turn_seconds:
                how = f"with its entries trained {schedule_text(old['settings'])}"
            elif was.design != now.design:
                how = f"for another tiny (hybrid {was.design})"
            else:
                kept = was.reuse_freed_memory
                how = "with freed memory " + ("kept for reuse" if kept else "returned to the system")
            echo(f"[{benchmark}] the saved record for these settings was measured {how}; "
                 f"replaced, without its entries {', '.join(not_raced)} (rerun them here to "
                 "compare)")  # fmt: skip
    records = sorted([*records, record], key=record_key)
    write_records(records, path, benchmark)
    return records


def saved(record: dict[str, Any], records: list[dict[str, Any]]) -> bool:
    """Whether :func:`save_record` kept ``record`` (alone or merged): a record of its key and date."""
    return any(record_key(r) == record_key(record) and r.get("date") == record.get("date")
               for r in records)  # fmt: skip


def write_records(records: list[dict[str, Any]], path: str | Path, benchmark: str) -> None:
    """``{"benchmark": …, "records": […]}`` as indented JSON (the file :func:`load_records`
    reads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"benchmark": benchmark, "records": records}, indent=1, ensure_ascii=False)
    path.write_text(text + "\n", encoding="utf-8")


def _ranked(entries: dict[str, dict]) -> list[tuple[str, dict]]:
    """Finished entries by validation bpc, then the failed ones."""
    return sorted(entries.items(), key=lambda kv: ("error" in kv[1], kv[1].get("val_bpc", 0.0)))


def _params_cell(result: dict, twin: int | None) -> str:
    gap = f" ({result['params'] / twin - 1:+.1%})" if twin and result["params"] != twin else ""
    return f"{result['params']:,}{gap}"


def epochs(result: dict[str, Any], train_tokens: int | None) -> float | None:
    """How many times an entry's training tokens cover the training split (``None`` for a
    record that did not store the split's size). Past one epoch an entry sees text again, and
    its validation score rewards generalising as well as learning fast."""
    return result["tokens"] / train_tokens if train_tokens else None


def _table(entries: dict[str, dict], train_tokens: int | None = None) -> list[str]:
    twin = entries.get("attention", {}).get("params")
    epoch_head, epoch_rule = (" epochs |", "---|") if train_tokens else ("", "")
    lines = [
        "| # | entry | model | sizes | params (vs attention twin) | steps | tokens/s |"
        f"{epoch_head} train loss | val bpc |",
        f"|---|---|---|---|---|---|---|{epoch_rule}---|---|",
    ]
    for rank, (name, r) in enumerate(_ranked(entries), start=1):
        if "error" in r:
            empty = "| " * (7 if train_tokens else 6)
            lines.append(f"| – | {name} | failed: {r['error'][:150]} {empty}|")
            continue
        model = r["model"] + (f" — {r['note']}" if r.get("note") else "")
        passes = f" {epochs(r, train_tokens):.1f} |" if train_tokens else ""
        lines.append(
            f"| {rank} | {name} | {model} | {r['sizes']} | {_params_cell(r, twin)} "
            f"| {r['steps']:,} | {r['tokens_per_s']:,.0f} |{passes} {r['train_loss']:.3f} "
            f"| {r['val_bpc']:.3f} |"
        )
    return lines


def verdict(entries: dict[str, dict]) -> str:
    """One line from the data: the winner, and the hybrid against its attention twin."""
    done = [(n, r) for n, r in _ranked(entries) if "error" not in r]
    if not done:
        return "No entry finished."
    name, best = done[0]
    parts = [f"Lowest validation bpc: **{name}** ({best['val_bpc']:.3f})"]
    hybrid, twin = entries.get("hybrid", {}), entries.get("attention", {})
    if "val_bpc" in hybrid and "val_bpc" in twin:
        parts.append(
            f"hybrid vs its attention twin: {hybrid['val_bpc']:.3f} vs {twin['val_bpc']:.3f} bpc "
            f"({hybrid['val_bpc'] - twin['val_bpc']:+.3f}) at "
            f"{hybrid['tokens_per_s'] / twin['tokens_per_s']:.2f}× the twin's tokens/s"
        )
    return "; ".join(parts) + "."


def load_warning(record: dict[str, Any]) -> str:
    """A warning when the 1-minute load average at the end of some entry's training exceeded the
    cores (other work competed for them, so its speed, and so its score, suffered); else ``""``."""
    loads = [r["load_average"] for r in record["entries"].values() if "load_average" in r]
    cores = record.get("cores")
    if not loads or cores is None or max(loads) <= cores + 0.5:
        return ""
    return (
        f"Warning: the load average reached {max(loads):.1f} on {cores} cores during training — "
        "other work shared the CPU, so speeds and scores are not comparable; rerun on an idle "
        "machine."
    )


def setting_label(
    settings: dict[str, Any],
    sep: str = " · ",
    *,
    seed: bool = True,
    corpus: str = CORPUS,
    per: str = "entry",
) -> str:
    """What tells two saved races apart, in words: ``240 s per entry · lr 0.001 · batch 16 × 128
    · seed 0`` (``sep`` between the parts; without the seed for a group of seeds), led by the
    corpus's name when it is not the default (``python-code corpus · 240 s per entry · …``);
    ``per`` names what gets the seconds (``"design"`` in :mod:`bench.designs`)."""
    s = settings
    parts = [f"{s['seconds']:g} s per {per}", f"lr {s['lr']:g}",
             f"batch {s['batch_size']} × {s['seq_len']}"]  # fmt: skip
    named = [f"{corpus} corpus"] if corpus != CORPUS else []
    return sep.join(named + parts + ([f"seed {s['seed']}"] if seed else []))


def schedule_text(settings: dict[str, Any], entries: int = 2) -> str:
    """How the entries shared the CPU: ``in turns of 10 s`` (:mod:`bench.turns`) or ``one after
    another`` (``turn_seconds`` 0, a single entry, or a record from before turns)."""
    turn = settings.get("turn_seconds", 0.0)
    return f"in turns of {turn:g} s" if turn > 0 and entries > 1 else "one after another"


def process_text(settings: dict[str, Any]) -> str:
    """How each worker ran: ``2 threads`` and, when it did, ``freed memory kept for reuse``
    (:mod:`minifusion.host_memory`; records from before that setting ran without it)."""
    threads = f"{settings['threads']} threads"
    return threads + (", freed memory kept for reuse" if settings.get("reuse_freed_memory") else "")


def held_out_text(works: Sequence[str], listed: int = 4) -> str:
    """The held-out documents by name, or counted with the first two named when there are more
    than ``listed`` (the record keeps the whole list)."""
    if len(works) <= listed:
        return ", ".join(works)
    return f"{len(works)} held-out documents ({works[0]}, {works[1]}, …)"


def record_markdown(record: dict[str, Any], level: int = 3) -> str:
    """One record: a heading with its settings, what ran where, the table, the verdict."""
    s, validation = record["settings"], record["validation"]
    scored = "every block" if validation["blocks"] == "all" else f"{validation['blocks']} blocks"
    split = (
        f" Training split: {record['train_tokens']:,} tokens." if "train_tokens" in record else ""
    )
    lines = [
        f"{'#' * level} {setting_label(s, corpus=record.get('corpus', CORPUS))}",
        "",
        f"{record['date']}, {record['machine']}, {process_text(s)}, entries trained "
        f"{schedule_text(s, len(record['entries']))}. Validation: "
        f"{held_out_text(validation['works'])} ({scored} of {s['seq_len']} tokens).{split}",
        "",
        *_table(record["entries"], record.get("train_tokens")),
        "",
        verdict(record["entries"]),
    ]
    warning = load_warning(record)
    return "\n".join(lines + (["", warning] if warning else []))


def seed_groups(records: list[dict[str, Any]], min_size: int = 2) -> list[list[dict[str, Any]]]:
    """Records that share every setting but the seed, and raced the same ``tiny``
    (:func:`hybrid_design`), in groups of ``min_size`` or more (each sorted by seed)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for record in records:
        key = tuple(v for k, v in zip(("corpus", *RECORD_KEY), record_key(record)) if k != "seed")
        key += (hybrid_design(record),)
        groups.setdefault(key, []).append(record)
    return [
        sorted(group, key=lambda r: r["settings"]["seed"])
        for group in groups.values()
        if len(group) >= min_size
    ]


def across_seeds(group: list[dict[str, Any]], level: int = 3) -> str:
    """One group of :func:`seed_groups` as a table: every entry that finished in two or more of
    its seeds, with mean ± sample sd of its bpc and tokens/s, and in how many of the seeds both
    ran the hybrid's bpc was lower (a gap that does not hold in every seed is not a result)."""
    s, corpus = group[0]["settings"], group[0].get("corpus", CORPUS)
    seeds = [r["settings"]["seed"] for r in group]
    label = setting_label(s, seed=False, corpus=corpus)
    design = hybrid_design(group[0])
    lines = [
        f"{'#' * level} Across seeds {', '.join(map(str, seeds))}: {label}",
        "",
        *([f"Hybrid: {design}.", ""] if design else []),
        "| entry | seeds | val bpc, mean ± sd | tokens/s, mean ± sd | hybrid's bpc lower in |",
        "|---|---|---|---|---|",
    ]
    hybrid = {
        r["settings"]["seed"]: r["entries"]["hybrid"]["val_bpc"]
        for r in group
        if "val_bpc" in r["entries"].get("hybrid", {})
    }
    rows = []
    for name in ENTRIES:
        runs = {
            r["settings"]["seed"]: r["entries"][name]
            for r in group
            if "val_bpc" in r["entries"].get(name, {})
        }
        if len(runs) < 2:
            continue
        shared = [seed for seed in runs if seed in hybrid]
        if name == "hybrid" or not shared:
            against = "–"
        else:
            wins, _ = wins_in_every_seed(
                [hybrid[seed] for seed in shared],
                [runs[seed]["val_bpc"] for seed in shared],
                higher=False,
            )
            against = f"{wins} of {len(shared)}"
        bpc = mean_and_spread([run["val_bpc"] for run in runs.values()])
        speed = mean_and_spread([run["tokens_per_s"] for run in runs.values()])
        rows.append(
            (
                bpc[0],
                f"| {name} | {', '.join(map(str, runs))} | {bpc[0]:.3f} ± {bpc[1]:.3f} "
                f"| {speed[0]:,.0f} ± {speed[1]:,.0f} | {against} |",
            )
        )
    return "\n".join(lines + [row for _, row in sorted(rows)])


def markdown(records: list[dict[str, Any]], level: int = 3) -> str:
    """Every record, one table each, then every group of seeds summarised (the RESULTS.md section
    of ``make bench``)."""
    if not records:
        return "No race saved yet: `python -m bench.race`."
    sections = [record_markdown(r, level) for r in records]
    sections += [across_seeds(group, level) for group in seed_groups(records)]
    return "\n\n".join(sections)


def report_data(
    *,
    quick: bool = False,
    models: Sequence[str] = tuple(ENTRIES),
    corpus: str = CORPUS,
    data_dir: str | Path | None = None,
    results_path: str | Path = RESULTS_FILE,
    **settings: Any,
) -> dict[str, Any]:
    """``make bench``'s race: run it (saved unless ``quick``); ``{"records": every record}``."""
    settings = {**(_QUICK if quick else {}), **settings}
    record = run(models, RaceSettings(**settings), corpus=corpus, data_dir=data_dir)
    return {"records": [record] if quick else save_record(record, results_path)}


# ----------------------------------------------------------------------------------------------
# Its section of bench/RESULTS.md and its README headline (rendered by bench.report)
# ----------------------------------------------------------------------------------------------
def race_table(per_device: PerDevice) -> str:
    """Every saved race record, one table each (:func:`markdown`), under its device."""
    return _device_blocks(per_device, lambda data: markdown(data["records"], level=4),
                          "Not run yet: `python -m bench.race`.")  # fmt: skip


def _headline_race(data: Data, corpus: str = CORPUS) -> str | None:
    """The default-settings race on ``corpus``: the hybrid's bpc against the best other entry's,
    saying so when the record raced an earlier ``tiny`` than ``configs/`` holds now."""
    default = record_key({"settings": RaceSettings().to_dict(), "corpus": corpus})
    record = next((r for r in data["records"] if record_key(r) == default), None)
    finished = {n: r for n, r in (record or {}).get("entries", {}).items() if "val_bpc" in r}
    if "hybrid" not in finished or len(finished) < 2:
        return None
    rival = min((n for n in finished if n != "hybrid"), key=lambda n: finished[n]["val_bpc"])
    earlier = "" if raced_today(record) else "; an earlier `tiny`"
    return (f"{finished['hybrid']['val_bpc']:.3f} vs {finished[rival]['val_bpc']:.3f} "
            f"({rival}{earlier})")  # fmt: skip


# ==============================================================================================
# The command
# ==============================================================================================
HELP_DESCRIPTION = """\
Train every entry for the same wall-clock time, each in a fresh process, with one recipe on
the same batches; print a table sorted by validation bits per character (lower is better) and
save it to bench/results/race.json (one record per seconds/lr/batch/seq-len/seed setting). A
--models subset updates those entries of the saved record; a single entry is not added to a
record whose entries took turns (alone it trains faster): race it beside one of them.

Recipe (flags change it for every entry alike): AdamW, betas 0.9/0.99, weight decay 0.1 on
weight matrices (not embeddings, norms, biases); peak --lr with a 50-step linear warm-up, then
a cosine over the time budget down to 10 %; gradient clipping 1.0; --batch-size random
sequences of --seq-len tokens from the training split, fixed by --seed (as are the initial
weights). Only training steps count towards --seconds. Data (--corpus): Shakespeare, two whole
works held out for validation, or SymPy's Python modules (python-code), 43 of them held out; a
4096-token BPE of the training split; prepared once and cached in bench/results/race_data/
(race_data_python-code/)."""


def _help_epilog() -> str:
    rows = [f"  {e.name:<10} {e.description}" for e in ENTRIES.values()]
    note = "The transformers entries are sized to the attention twin's parameter count."
    return "\n".join(["entries (--models):", *rows, "", note])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.race",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=HELP_DESCRIPTION,
        epilog=_help_epilog(),
    )
    d = RaceSettings()
    parser.add_argument(
        "--models",
        nargs="+",
        choices=list(ENTRIES),
        default=list(ENTRIES),
        metavar="NAME",
        help="entries to race, see below (default: all of them)",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        help=f"training seconds per entry (default {d.seconds:g}; {QUICK_SECONDS:g} with --quick)",
    )
    parser.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (%(default)g)")
    parser.add_argument(
        "--batch-size", type=int, default=d.batch_size, help="sequences per step (%(default)s)"
    )
    parser.add_argument(
        "--seq-len",
        type=int,
        default=d.seq_len,
        help="tokens per sequence, training and validation (%(default)s)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=d.threads,
        help="torch.set_num_threads in every worker (%(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        help="initial weights and training batches (%(default)s)",
    )
    parser.add_argument(
        "--corpus",
        choices=CORPORA,
        default=CORPUS,
        help="the text to train and validate on (%(default)s; python-code: SymPy's modules, "
        "full of exact repetition that attention can recall)",
    )
    add_worker_arguments(parser)
    parser.add_argument("--no-save", action="store_true", help=f"do not write {RESULTS_FILE.name}")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {QUICK_SECONDS:g} s per entry, {QUICK_EVAL_BLOCKS} "
        "validation blocks; not saved",
    )
    parser.add_argument(
        "--show", action="store_true", help="print every saved record as Markdown and exit"
    )
    parser.add_argument("--results", type=Path, default=RESULTS_FILE, help=argparse.SUPPRESS)
    # the arguments of a worker's process (run_workers)
    hidden_arguments = (
        "--worker --settings-json --data-json --out --overrides-json --control-fd --label"
    )
    for hidden in hidden_arguments.split():
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """How the entries' processes run — ``--turn-seconds`` and ``--return-freed-memory`` —
    shared by the race, ``bench.designs`` and ``bench.ablation``
    (:func:`worker_settings` reads them back)."""
    parser.add_argument(
        "--turn-seconds",
        type=float,
        default=TURN_SECONDS,
        help="the entries' processes take turns on the CPU, this many training seconds each, "
        "so that a slow stretch of the host slows them all alike (%(default)g; 0: one after "
        "another)",
    )
    parser.add_argument(
        "--return-freed-memory",
        action="store_true",
        help="let glibc unmap large freed blocks, its default (otherwise every entry's process "
        "keeps them for the next step: minifusion.host_memory)",
    )


def worker_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`RaceSettings` fields that :func:`add_worker_arguments` sets."""
    return {"turn_seconds": args.turn_seconds, "reuse_freed_memory": not args.return_freed_memory}


def settings_or_exit(prog: str, **values: Any) -> RaceSettings:
    """``RaceSettings(**values)`` for a command line: a refused value ends the command with its
    reason (``prog: error: --seconds must be > 0, …``), before any data or model is built."""
    try:
        return RaceSettings(**values)
    except ValueError as error:
        raise SystemExit(f"{prog}: error: {error}") from None


def settings_from_args(args: argparse.Namespace) -> RaceSettings:
    quick = _QUICK if args.quick else {}
    return settings_or_exit(
        "python -m bench.race",
        **{**quick, **({"seconds": args.seconds} if args.seconds is not None else {})},
        lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len, threads=args.threads,
        seed=args.seed, **worker_settings(args),
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return _worker_main(args)
    if args.show:
        print(markdown(load_records(args.results)))
        return 0
    settings = settings_from_args(args)
    record = run(args.models, settings, corpus=args.corpus)
    print()
    print(record_markdown(record))
    if not (args.quick or args.no_save):
        if saved(record, save_record(record, args.results)):
            print(f"\n[race] saved to {args.results}")
    return 0 if any("error" not in r for r in record["entries"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
