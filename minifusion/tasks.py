"""Chapter 16 — why hybrid? Two synthetic tasks, four models of equal size, and small experiments.

The chapter notebook and ``bench/why_hybrid.py`` both run their experiments from this module, so
the numbers in the notebook and in the benchmark come from one implementation.

**Tasks.** Each generates batches from a ``torch.Generator`` (batch ``n`` of a generator seeded
with ``s`` is always the same) as a :class:`TaskBatch`: ``inputs`` and ``targets`` (the same
sequence shifted by one token, as in language modelling) and a boolean ``mask`` of the *answer
positions* — the only positions the loss and the accuracy look at.

* :class:`AssociativeRecall` — multi-query associative recall, MQAR (Arora et al., 2023,
  "Zoology: Measuring and Improving Recall in Efficient Language Models"): key–value pairs, then
  keys asked again; the answer to a key is the value it was paired with. Exact recall of
  arbitrary earlier tokens: attention looks them up, a fixed-size state must have stored them.
* :class:`SelectiveCopying` — selective copying (Gu & Dao, 2023, "Mamba: Linear-Time Sequence
  Modeling with Selective State Spaces", §3.1): a few data tokens scattered among noise tokens,
  then a marker; the model must write the data tokens out in order. The noise must be skipped
  according to *what* a token is, not *where* it is — input-dependent selection.

**Models.** :func:`four_models` builds four :class:`~minifusion.config.MiniFusionConfig` s that
differ only in their mixers (attention only, Mamba only, interleaved, parallel hybrid) and in the
width of their feed-forward layers, which is solved so that all four have the same parameter
count (:func:`check_equal_parameters`).

**Experiments.** :func:`train_on_task` / :func:`evaluate_task` / :func:`compare_on_task` train and
score the models on a task with one :class:`TaskBudget` (same steps, batch, learning-rate
schedule, data order); :func:`train_lm_for_seconds` / :func:`compare_lm` train them as language
models for the same number of *seconds* and record validation bits per character over time.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .config import MiniFusionConfig
from .model import MiniFusionForCausalLM
from .training import (
    BatchStream,
    TrainConfig,
    ValidationSet,
    build_optimizer,
    build_scheduler,
    compute_loss,
    evaluate,
    model_statistics,
    warmup_cosine,
)

__all__ = [
    "EVAL_SEED_OFFSET",
    "MODEL_NAMES",
    "AssociativeRecall",
    "LMBudget",
    "LMRun",
    "SelectiveCopying",
    "TaskBatch",
    "TaskBudget",
    "TaskRun",
    "build_model",
    "check_equal_parameters",
    "compare_lm",
    "compare_on_task",
    "evaluate_task",
    "four_models",
    "interleaved_mixers",
    "task_loss",
    "time_schedule",
    "train_lm_for_seconds",
    "train_on_task",
]

#: The four model families, in the order every table uses.
MODEL_NAMES = ("attention", "mamba", "interleaved", "hybrid")


# ----------------------------------------------------------------------------------------------
# The tasks
# ----------------------------------------------------------------------------------------------
@dataclass
class TaskBatch:
    """One batch of a synthetic task.

    ``inputs`` and ``targets`` are ``(B, T)`` int64 with ``targets[:, t] == sequence[:, t + 1]``
    (next-token prediction, like the language model); ``mask (B, T)`` is True at the answer
    positions, where ``targets`` holds an answer. Only those positions are scored.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor

    @property
    def sequences(self) -> torch.Tensor:
        """The full sequences ``(B, T + 1)``: the inputs followed by the last target."""
        return torch.cat([self.inputs, self.targets[:, -1:]], dim=1)


def _shifted(sequences: torch.Tensor, answer_positions: torch.Tensor) -> TaskBatch:
    """``sequences (B, T+1)`` → a :class:`TaskBatch`; ``answer_positions`` index the *inputs*."""
    mask = torch.zeros(sequences.shape[0], sequences.shape[1] - 1, dtype=torch.bool)
    mask[:, answer_positions] = True
    return TaskBatch(sequences[:, :-1].contiguous(), sequences[:, 1:].contiguous(), mask)


@dataclass(frozen=True)
class AssociativeRecall:
    """Multi-query associative recall (MQAR; Arora et al., 2023).

    **Vocabulary** (``vocab_size = num_keys + num_values``): ids ``0 … num_keys−1`` are keys,
    written ``k0, k1, …``; ids ``num_keys … num_keys+num_values−1`` are values, ``v0, v1, …``.

    **Sequence** (``2·num_pairs + 2·num_queries`` tokens), for ``P = num_pairs`` and
    ``Q = num_queries``::

        k_a v_a  k_b v_b  …  (P pairs: distinct keys, values drawn with replacement)
        k_q1 v_q1  k_q2 v_q2  …  (Q queries: distinct keys from the pairs, each followed by its value)

    e.g. ``k3 v7 k1 v2 k9 v0 k5 v5 | k1 v2 k9 v0`` with ``P = 4``, ``Q = 2``. The model reads
    ``inputs = sequence[:-1]`` and predicts ``targets = sequence[1:]``; the **answer positions**
    are the query keys, input positions ``2P + 2j`` for ``j = 0 … Q−1``, whose target is the
    value paired with that key in the first part. The value that follows a query key in the input
    is the previous answer (teacher forcing, as in language modelling); it never reveals a later
    answer, because every key is asked once.
    """

    num_pairs: int = 8
    num_queries: int = 8
    num_keys: int = 32
    num_values: int = 32

    def __post_init__(self) -> None:
        if min(self.num_pairs, self.num_queries, self.num_keys, self.num_values) < 1:
            raise ValueError("num_pairs, num_queries, num_keys and num_values must be ≥ 1.")
        if self.num_pairs > self.num_keys:
            raise ValueError(
                f"num_pairs={self.num_pairs} > num_keys={self.num_keys}: the keys of a sequence "
                "are distinct, so there must be at least as many keys as pairs."
            )
        if self.num_queries > self.num_pairs:
            raise ValueError(
                f"num_queries={self.num_queries} > num_pairs={self.num_pairs}: each key is asked "
                "at most once. Use num_queries ≤ num_pairs."
            )

    name = "associative recall"

    @property
    def vocab_size(self) -> int:
        return self.num_keys + self.num_values

    @property
    def seq_len(self) -> int:
        """Length ``T`` of ``inputs`` (the full sequence has ``T + 1`` tokens)."""
        return 2 * self.num_pairs + 2 * self.num_queries - 1

    def answer_positions(self) -> torch.Tensor:
        """Input positions scored: the query keys, ``2P + 2j``."""
        return 2 * self.num_pairs + 2 * torch.arange(self.num_queries)

    def sample(self, batch_size: int, generator: torch.Generator) -> TaskBatch:
        """``batch_size`` sequences drawn with ``generator`` (see the class docstring)."""
        P, Q = self.num_pairs, self.num_queries
        keys = torch.rand(batch_size, self.num_keys, generator=generator).argsort(dim=1)[:, :P]
        values = self.num_keys + torch.randint(
            self.num_values, (batch_size, P), generator=generator
        )
        asked = torch.rand(batch_size, P, generator=generator).argsort(dim=1)[:, :Q]
        query_keys, query_values = keys.gather(1, asked), values.gather(1, asked)
        context = torch.stack([keys, values], dim=2).flatten(1)  # k v k v …
        queries = torch.stack([query_keys, query_values], dim=2).flatten(1)
        return _shifted(torch.cat([context, queries], dim=1), self.answer_positions())

    def token_names(self, ids) -> list[str]:
        """Readable names of token ids: ``k3``, ``v7``."""
        return [f"k{i}" if i < self.num_keys else f"v{i - self.num_keys}" for i in _ints(ids)]


@dataclass(frozen=True)
class SelectiveCopying:
    """Selective copying (Gu & Dao, 2023, §3.1).

    **Vocabulary** (``vocab_size = 2 + num_symbols``): id 0 is the noise token (written ``·``),
    id 1 the marker (``▶``), ids ``2 … num_symbols+1`` the data symbols (``A, B, C, …``).

    **Sequence** (``region + 1 + num_tokens`` tokens)::

        region: `region` positions, `num_tokens` of them (random, distinct) hold data symbols
                (drawn with replacement), all others the noise token
        ▶       the marker
        d_1 … d_N  the data symbols again, in the order they appeared

    e.g. ``· C · · A · · B ▶ C A B`` with ``region = 8``, ``num_tokens = 3``. The model reads
    ``inputs = sequence[:-1]`` and predicts ``targets = sequence[1:]``; the **answer positions**
    are input positions ``region + j`` for ``j = 0 … N−1`` (the marker, then ``d_1 … d_{N−1}``),
    whose targets are ``d_1 … d_N``. Where the data sit changes from sequence to sequence, so a
    fixed time shift cannot solve it: the model must keep a token because of *what* it is.
    """

    num_tokens: int = 4
    region: int = 24
    num_symbols: int = 8

    def __post_init__(self) -> None:
        if min(self.num_tokens, self.region, self.num_symbols) < 1:
            raise ValueError("num_tokens, region and num_symbols must be ≥ 1.")
        if self.num_tokens > self.region:
            raise ValueError(
                f"num_tokens={self.num_tokens} > region={self.region}: the data symbols need "
                "distinct positions in the region. Use a longer region."
            )

    name = "selective copying"
    NOISE = 0
    MARKER = 1

    @property
    def vocab_size(self) -> int:
        return 2 + self.num_symbols

    @property
    def seq_len(self) -> int:
        """Length ``T`` of ``inputs`` (the full sequence has ``T + 1`` tokens)."""
        return self.region + self.num_tokens

    def answer_positions(self) -> torch.Tensor:
        """Input positions scored: the marker and the copied symbols but the last."""
        return self.region + torch.arange(self.num_tokens)

    def sample(self, batch_size: int, generator: torch.Generator) -> TaskBatch:
        """``batch_size`` sequences drawn with ``generator`` (see the class docstring)."""
        N = self.num_tokens
        where = torch.rand(batch_size, self.region, generator=generator).argsort(dim=1)[:, :N]
        where = where.sort(dim=1).values  # the data keep their order of appearance
        data = 2 + torch.randint(self.num_symbols, (batch_size, N), generator=generator)
        region = torch.full((batch_size, self.region), self.NOISE, dtype=torch.long)
        region.scatter_(1, where, data)
        marker = torch.full((batch_size, 1), self.MARKER, dtype=torch.long)
        return _shifted(torch.cat([region, marker, data], dim=1), self.answer_positions())

    def token_names(self, ids) -> list[str]:
        """Readable names of token ids: ``·`` noise, ``▶`` marker, ``A``, ``B``, … data."""
        names = {self.NOISE: "·", self.MARKER: "▶"}
        return [names.get(i, _symbol(i - 2)) for i in _ints(ids)]


def _symbol(index: int) -> str:
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    return letters[index] if index < len(letters) else f"S{index}"


def _ints(ids) -> list[int]:
    return [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]


# ----------------------------------------------------------------------------------------------
# Four models of equal size
# ----------------------------------------------------------------------------------------------
def interleaved_mixers(num_layers: int, attention_every: int = 2) -> list[str]:
    """Jamba-style interleaving: layer ``i`` is attention when ``(i + 1) % attention_every == 0``,
    Mamba otherwise — ``attention_every=2`` alternates ``mamba, attention, …``; Jamba uses one
    attention layer in eight (Lieber et al., 2024)."""
    if attention_every < 1:
        raise ValueError(f"attention_every={attention_every} must be ≥ 1.")
    return ["attention" if (i + 1) % attention_every == 0 else "mamba" for i in range(num_layers)]


#: The Mamba settings :func:`four_models` copies from the shipped default preset.
MAMBA_SHAPE_KEYS = ("mamba_expand", "mamba_d_state", "mamba_d_conv")


def default_mamba_shape(preset: str = "tiny") -> dict[str, int]:
    """The Mamba expansion, state size and convolution width of ``preset`` (the default, ``tiny``).

    :func:`four_models` builds its Mamba mixers this way, so the comparison is about the Mamba
    the package ships (``tiny`` runs it at expansion 1), not a wider one it does not use.
    """
    config = MiniFusionConfig.from_preset(preset)
    return {key: getattr(config, key) for key in MAMBA_SHAPE_KEYS}


def _mixer_patterns(num_layers: int, attention_every: int) -> dict[str, list[str]]:
    return {
        "attention": ["attention"] * num_layers,
        "mamba": ["mamba"] * num_layers,
        "interleaved": interleaved_mixers(num_layers, attention_every),
        "hybrid": ["hybrid"] * num_layers,
    }


def four_models(
    vocab_size: int,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_len: int = 256,
    attention_every: int = 2,
    target_parameters: int | None = None,
    **overrides,
) -> dict[str, MiniFusionConfig]:
    """Configs of the four families, equal in width, depth and parameter count.

    ``attention`` (every mixer attention: a Llama-style transformer), ``mamba`` (every mixer
    Mamba), ``interleaved`` (:func:`interleaved_mixers`, Jamba-style) and ``hybrid`` (every mixer
    both in parallel, gated: MiniFusion's own layer). Every layer has a dense SwiGLU feed-forward,
    so the mixer is the only difference in structure; all heads are global (no sliding window).

    **Equal parameters.** A hybrid layer holds two mixers, an attention layer one small one, so
    the budget left for the feed-forward layers differs: each model's ``intermediate_size`` is
    solved so that its total parameter count equals ``target_parameters`` (rounded to a whole
    feed-forward channel, i.e. within ``3 · hidden_size · num_layers / 2`` parameters). By default
    the target is the hybrid with ``intermediate_size = hidden_size``. The fusion gate's rank is
    ``hidden_size // 4`` (the preset default of 96 would exceed these small widths); the Mamba
    mixers take the default preset's shape (:func:`default_mamba_shape`). ``overrides`` go to
    every config (e.g. ``mamba_expand=2``, ``fusion_gate_rank``).
    """
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        max_position_embeddings=max_len,
        fusion_gate_rank=max(hidden_size // 4, 1),
        **default_mamba_shape(),
    )
    settings.update(overrides)
    patterns = _mixer_patterns(num_layers, attention_every)
    ffn = ["dense"] * num_layers

    def build(name: str, intermediate: int) -> MiniFusionConfig:
        return MiniFusionConfig(
            **settings, mixer_types=patterns[name], ffn_types=ffn, intermediate_size=intermediate
        )

    if target_parameters is None:
        target_parameters = build("hybrid", hidden_size).estimate_parameters()
    per_channel = 3 * hidden_size * num_layers  # gate, up and down rows of every SwiGLU
    configs = {}
    for name in MODEL_NAMES:
        without_ffn = build(name, 1).estimate_parameters() - per_channel
        intermediate = round((target_parameters - without_ffn) / per_channel)
        if intermediate < 1:
            raise ValueError(
                f"target_parameters={target_parameters:,} is too small for the {name!r} model: "
                f"its mixers alone hold {without_ffn:,} parameters. Raise the target (or leave it "
                "at None) or lower hidden_size / num_layers."
            )
        configs[name] = build(name, intermediate)
    return configs


def check_equal_parameters(
    configs: dict[str, MiniFusionConfig], tolerance: float = 0.05
) -> dict[str, int]:
    """Parameter counts of ``configs``; raises ``ValueError`` if one differs from their mean by
    more than ``tolerance`` (a fraction: 0.05 is ±5 %)."""
    counts = {name: config.estimate_parameters() for name, config in configs.items()}
    mean = sum(counts.values()) / len(counts)
    off = {name: count / mean - 1 for name, count in counts.items()}
    bad = {name: f"{gap:+.2%}" for name, gap in off.items() if abs(gap) > tolerance}
    if bad:
        raise ValueError(
            f"Parameter counts differ from their mean ({mean:,.0f}) by more than ±{tolerance:.0%}: "
            f"{bad}. Solve the feed-forward widths again (four_models) or widen the tolerance."
        )
    return counts


def build_model(config: MiniFusionConfig, seed: int) -> MiniFusionForCausalLM:
    """The model of ``config`` with weights initialised from ``seed``."""
    torch.manual_seed(seed)
    return MiniFusionForCausalLM(config)


# ----------------------------------------------------------------------------------------------
# Training and scoring on a task
# ----------------------------------------------------------------------------------------------
@dataclass
class TaskBudget:
    """What every model gets on a task: the same steps, batch, learning rate schedule and data.

    The learning rate warms up linearly for ``warmup_steps`` and then follows a cosine down to
    ``min_lr_ratio · lr`` (:func:`~minifusion.training.warmup_cosine`), with AdamW's two parameter
    groups and global-norm clipping, as in chapter 12. ``seed`` fixes the initial weights and the
    training batches (every model sees the same batches); evaluation batches come from another
    seed, so they were never trained on.
    """

    steps: int = 200
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_batches: int = 8
    seed: int = 0

    def train_config(self) -> TrainConfig:
        """The chapter 12 settings object with these values (for the optimizer and scheduler)."""
        return TrainConfig(
            batch_size=self.batch_size,
            max_steps=self.steps,
            lr=self.lr,
            warmup_steps=self.warmup_steps,
            min_lr_ratio=self.min_lr_ratio,
            weight_decay=self.weight_decay,
            grad_clip=self.grad_clip,
            seed=self.seed,
            device="cpu",
            tensorboard=False,
        )


#: Offset between the training and the evaluation seed of a task.
EVAL_SEED_OFFSET = 1_000_003


@dataclass
class TaskRun:
    """One model trained on one task: its loss curve and its held-out scores."""

    model: str
    task: str
    parameters: int
    steps: int
    losses: list[float]  # training loss of every step: answer positions + auxiliary terms (nats)
    accuracy: float  # fraction of answer positions predicted exactly (held-out batches)
    exact: float  # fraction of held-out sequences with every answer right
    seconds: float  # training time (wall clock)
    # hybrid layers: the fusion gate's mean on the last held-out batch (1 = all Mamba, 0 = all
    # attention), keyed "layer{i}"
    gates: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def task_loss(
    model: nn.Module, batch: TaskBatch
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, correct, logits)``: cross-entropy at the answer positions only (plus the model's
    auxiliary losses, as in training), and a ``(B, A)`` bool tensor of exact argmax answers."""
    out = model(input_ids=batch.inputs)
    answers = out.logits[batch.mask].float()  # (B·A, V), row-major: sequence by sequence
    targets = batch.targets[batch.mask]
    loss = F.cross_entropy(answers, targets)
    loss = loss + out.moe_aux_loss + out.gate_balance_loss + out.gate_entropy_loss
    correct = (answers.argmax(-1) == targets).view(batch.inputs.shape[0], -1)
    return loss, correct, out.logits


def train_on_task(
    config: MiniFusionConfig, task, budget: TaskBudget
) -> tuple[MiniFusionForCausalLM, list[float], float]:
    """Train a fresh model of ``config`` on ``task``: ``(model, losses per step, seconds)``."""
    settings = budget.train_config()
    model = build_model(config, budget.seed)
    model.train()
    optimizer = build_optimizer(model, settings)
    scheduler = build_scheduler(optimizer, settings)
    generator = torch.Generator().manual_seed(budget.seed)
    losses = []
    start = time.perf_counter()
    for _ in range(budget.steps):
        loss, _, _ = task_loss(model, task.sample(budget.batch_size, generator))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if budget.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), budget.grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return model, losses, time.perf_counter() - start


@torch.no_grad()
def evaluate_task(
    model: nn.Module, task, *, batches: int, batch_size: int, seed: int
) -> tuple[float, float]:
    """``(accuracy, exact)`` on ``batches`` batches drawn from ``seed + EVAL_SEED_OFFSET``:
    the fraction of answer positions right, and of sequences with *every* answer right."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed + EVAL_SEED_OFFSET)
    right = whole = count = rows = 0
    for _ in range(batches):
        _, correct, _ = task_loss(model, task.sample(batch_size, generator))
        right += int(correct.sum())
        count += correct.numel()
        whole += int(correct.all(dim=1).sum())
        rows += correct.shape[0]
    model.train(was_training)
    return right / count, whole / rows


def compare_on_task(
    configs: dict[str, MiniFusionConfig], task, budget: TaskBudget
) -> dict[str, TaskRun]:
    """Train and score every model of ``configs`` on ``task`` with the same ``budget``."""
    runs = {}
    for name, config in configs.items():
        model, losses, seconds = train_on_task(config, task, budget)
        accuracy, exact = evaluate_task(
            model, task, batches=budget.eval_batches, batch_size=budget.batch_size, seed=budget.seed
        )
        gates = {
            key.split("/")[1]: value
            for key, value in model_statistics(model).items()
            if key.startswith("gate/") and key.endswith("/mean")
        }
        runs[name] = TaskRun(
            model=name,
            task=task.name,
            parameters=model.num_parameters(),
            steps=budget.steps,
            losses=losses,
            accuracy=accuracy,
            exact=exact,
            seconds=seconds,
            gates=gates,
        )
    return runs


# ----------------------------------------------------------------------------------------------
# Language modelling at equal wall-clock time
# ----------------------------------------------------------------------------------------------
@dataclass
class LMBudget:
    """What every model gets as a language model: the same *seconds* of training.

    Only optimizer steps count towards ``seconds``; the evaluations (``evals`` of them, evenly
    spaced in time, plus one before training) stop the clock. The learning rate follows
    :func:`~minifusion.training.warmup_cosine` over the *fraction of the time spent*, so a fast
    model and a slow one both finish their schedule when the time is up.
    """

    seconds: float = 5.0
    batch_size: int = 16
    block_size: int = 64
    lr: float = 3e-3
    warmup_fraction: float = 0.1
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    evals: int = 5
    eval_blocks: int = 32
    seed: int = 0


@dataclass
class LMRun:
    """One model trained as a language model for a fixed time."""

    model: str
    parameters: int
    steps: int
    tokens: int
    seconds: list[float] = field(default_factory=list)  # training seconds at each evaluation
    eval_steps: list[int] = field(default_factory=list)  # optimizer steps taken by then
    bpc: list[float] = field(default_factory=list)  # validation bits per character there

    @property
    def final_bpc(self) -> float:
        return self.bpc[-1]

    def to_dict(self) -> dict:
        return {**asdict(self), "final_bpc": self.final_bpc}


def time_schedule(fraction: float, warmup_fraction: float, min_lr_ratio: float) -> float:
    """Learning-rate multiplier after ``fraction`` (0…1) of the time: warm-up, then cosine."""
    steps = 1000  # warmup_cosine counts steps; a time fraction becomes one of 1000 "steps"
    return warmup_cosine(
        min(int(fraction * steps), steps - 1),
        warmup_steps=round(warmup_fraction * steps),
        max_steps=steps,
        min_lr_ratio=min_lr_ratio,
    )


def train_lm_for_seconds(
    name: str,
    config: MiniFusionConfig,
    train_file,
    validation: ValidationSet,
    budget: LMBudget,
) -> LMRun:
    """Train a fresh model of ``config`` on ``train_file`` for ``budget.seconds`` seconds."""
    settings = TrainConfig(
        batch_size=budget.batch_size,
        block_size=budget.block_size,
        lr=budget.lr,
        weight_decay=budget.weight_decay,
        device="cpu",
        tensorboard=False,
    )
    model = build_model(config, budget.seed)
    optimizer = build_optimizer(model, settings)
    stream = BatchStream(train_file, budget.block_size, budget.batch_size, seed=budget.seed)
    run = LMRun(model=name, parameters=model.num_parameters(), steps=0, tokens=0)

    def record(elapsed: float) -> None:
        result = evaluate(
            model, validation, batch_size=budget.batch_size, max_blocks=budget.eval_blocks
        )
        run.seconds.append(elapsed)
        run.eval_steps.append(run.steps)
        run.bpc.append(result.bpc)

    record(0.0)
    elapsed, next_eval = 0.0, budget.seconds / budget.evals
    model.train()
    while elapsed < budget.seconds:
        start = time.perf_counter()
        fraction = elapsed / budget.seconds
        multiplier = time_schedule(fraction, budget.warmup_fraction, budget.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = budget.lr * multiplier
        inputs, targets = stream.next_batch()
        loss = compute_loss(model, inputs, targets).total
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if budget.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), budget.grad_clip)
        optimizer.step()
        elapsed += time.perf_counter() - start
        run.steps += 1
        run.tokens += inputs.numel()
        if elapsed >= next_eval or elapsed >= budget.seconds:
            record(elapsed)
            while next_eval <= elapsed:  # a slow step may pass several evaluation times
                next_eval += budget.seconds / budget.evals
    return run


def compare_lm(
    configs: dict[str, MiniFusionConfig], train_file, validation: ValidationSet, budget: LMBudget
) -> dict[str, LMRun]:
    """Train every model of ``configs`` as a language model for the same time."""
    return {
        name: train_lm_for_seconds(name, config, train_file, validation, budget)
        for name, config in configs.items()
    }
