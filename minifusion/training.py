"""Chapter 12 — the training loop on one device, readable top to bottom.

One optimisation step, in the order the code below runs it:

1. **Batches** come from the memory-mapped token file; batch ``n`` is a pure function of
   ``(seed, n)`` (:class:`BatchStream`), so a resumed run reads exactly what an uninterrupted
   run would have read.
2. **Forward + backward** under bf16 autocast where that is faster (CUDA), fp32 otherwise,
   ``grad_accum_steps`` micro-batches summed into one step (each loss divided by their number,
   and weighted by its share of the scored tokens where targets hold ``-100``, so the gradient
   equals the gradient of one big batch).
3. **Guard**: a non-finite loss or gradient norm skips the step (the optimizer never sees it);
   ``max_bad_steps`` such steps in a row stop the run with an explanation.
4. **Clip** the gradient's global norm to ``grad_clip``.
5. **AdamW** with two parameter groups — weight decay on matrices, none on norms, biases,
   embeddings (by choice) and Mamba's ``A_log``, ``D``, ``dt_proj.bias`` — and a learning rate
   that warms up linearly, then follows a cosine down to ``min_lr_ratio · lr``.
6. **Measure**: loss, learning rate, tokens/s, gate and MoE statistics go to ``metrics.jsonl``,
   TensorBoard and the progress bar; every ``eval_every`` steps the validation loss, bits per
   character, a loss-curve PNG and a sample text; every ``save_every`` steps a checkpoint.

The :class:`Trainer` owns the state a checkpoint must hold (chapter 13) and stops cleanly on
SIGTERM/SIGINT: it finishes the step in progress, saves, and returns.

Each piece it puts together has a module of its own, and every name below stays importable from
here: :mod:`~minifusion.train_config` (the settings), :mod:`~minifusion.optim` (AdamW and the
schedule), :mod:`~minifusion.precision` (autocast, loss scaling, TF32),
:mod:`~minifusion.batches` (resumable batches), :mod:`~minifusion.evaluation` (loss, bits per
character, samples) and :mod:`~minifusion.metrics` (statistics, metrics file, loss curve).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .batches import BatchStream, StreamingBatches
from .checkpoint import (
    capture_rng_state,
    check_compatible,
    export_pretrained,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from .data import TokenFile
from .evaluation import (
    EvalResult,
    LossParts,
    ValidationSet,
    check_chunked_loss_model,
    compute_loss,
    evaluate,
    generate_sample,
    validation_sums,
)
from .metrics import MetricsLog, model_statistics, plot_loss_curve
from .moe import MoE
from .monitor import GateMonitor, plot_gate_heatmaps
from .optim import (
    OPTIMIZER_SETTINGS,
    _ScheduleMultiplier,
    build_optimizer,
    build_scheduler,
    parameter_groups,
    warmup_cosine,
)
from .precision import _autocast, autocast_dtype, grad_scaler, use_tf32
from .tokenizer import tokenizer_hash
from .train_config import CHECKPOINTING_MODES, PRECISIONS, TrainConfig, checkpointing_mode

__all__ = [
    "BatchStream",
    "EvalResult",
    "LossParts",
    "MetricsLog",
    "StopRequest",
    "StreamingBatches",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainingDivergedError",
    "ValidationSet",
    "CHECKPOINTING_MODES",
    "OPTIMIZER_SETTINGS",
    "PRECISIONS",
    "autocast_dtype",
    "build_optimizer",
    "build_scheduler",
    "checkpointing_mode",
    "compute_loss",
    "evaluate",
    "generate_sample",
    "grad_scaler",
    "model_statistics",
    "parameter_groups",
    "plot_loss_curve",
    "use_tf32",
    "validation_sums",
    "warmup_cosine",
]


# ----------------------------------------------------------------------------------------------
# Stopping cleanly
# ----------------------------------------------------------------------------------------------
class TrainingDivergedError(RuntimeError):
    """Too many non-finite steps in a row."""


class StopRequest:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step.

    The first signal only sets the flag (the step finishes, a checkpoint is saved, the run
    returns); the original handlers are put back at once, so a second Ctrl-C interrupts
    immediately for someone who really wants out.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame) -> None:
        self.signal_name = signal.Signals(signum).name
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        try:
            yield self
        finally:
            self._restore()

    def __bool__(self) -> bool:
        return self.signal_name is not None


# ----------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    step: int
    tokens: int
    stopped_by: str  # "max_steps", "stop_at", or the signal's name
    checkpoint: Path | None
    final_eval: EvalResult | None = None
    export: Path | None = None
    seconds: float = 0.0
    skipped_steps: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)


def _token_weights(micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    """How much each micro-batch's mean loss weighs so that their average is the mean over all
    scored tokens: ``count · k / total`` per micro-batch, where ``count`` is its number of targets
    other than ``-100`` (cross-entropy's ignore index). Exactly 1 when every micro-batch scores
    as many tokens (pretraining's full blocks), so the plain average stays bit for bit the same.
    """
    counts = [int((targets != -100).sum()) for _, targets in micro_batches]
    total = sum(counts)
    if total == 0:  # nothing scored anywhere: every mean is NaN, and the guard skips the step
        return [1.0] * len(counts)
    return [count * len(counts) / total for count in counts]


class Trainer:
    """Train ``model`` on a token file, writing everything into ``out_dir``.

    ``out_dir`` receives ``metrics.jsonl``, ``tensorboard/``, ``loss_curve.png``,
    ``samples.txt``, ``checkpoints/step_NNNNNN/`` and, at the end, ``model/`` (a Hugging Face
    folder with safetensors). With ``resume=True`` the newest checkpoint in ``out_dir`` is
    loaded first (if there is one).

    Args:
        model: a ``MiniFusionForCausalLM`` (any model returning ``logits`` and the aux losses).
        tokenizer: the tokenizer the token files were made with.
        train_file, val_file: token files (``minifusion.data.prepare_data`` writes them).
        config: the training settings.
        out_dir: the run folder.
        batches: where training batches come from instead of ``train_file`` (which may then be
            ``None``) — a :class:`StreamingBatches` for a streamed corpus, instruction examples
            for fine-tuning (``minifusion.instruct``).
        validation: what the evaluations score instead of ``val_file`` (which may then be
            ``None``): anything with :class:`ValidationSet`'s ``blocks``/``indices``/
            ``characters_of``; targets of ``-100`` are not scored.
        progress: show a tqdm progress bar.
        verbose: print one line per evaluation (no timings, so notebook output is repeatable).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        train_file: str | Path | None,
        val_file: str | Path | None,
        config: TrainConfig,
        out_dir: str | Path,
        *,
        resume: bool = True,
        progress: bool = True,
        verbose: bool = True,
        batches: BatchStream | StreamingBatches | None = None,
        validation: ValidationSet | None = None,
    ):
        config.validate()
        self.config, self.tokenizer = config, tokenizer
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.device = _resolve_device(config.device)
        self.dtype = autocast_dtype(config.precision, self.device)
        self.compute_dtype = self.dtype  # for reports (DeepSpeed's engine takes over autocast)
        self.scaler = grad_scaler(self.dtype, self.device)  # fp16 only
        if config.tf32:
            use_tf32(True)
        self.model = model.to(self.device).train()
        if config.loss_chunk_rows:
            check_chunked_loss_model(self.model)  # before any data is read or step taken
        if config.compile:
            # The chunked loss calls the body (model.model) directly: compile what is called.
            (self.model.model if config.loss_chunk_rows else self.model).compile()
        checkpointing = checkpointing_mode(config.gradient_checkpointing)
        if checkpointing == "layers":
            # Non-reentrant checkpointing works with inputs that need no grad (our token ids).
            self.model.activation_checkpointing_enable({"use_reentrant": False})
        elif checkpointing == "branches":
            self.model.checkpoint_branches()
        self.tokenizer_hash = tokenizer_hash(tokenizer)
        self.progress, self.verbose = progress, verbose

        if batches is None:
            train_tokens = TokenFile(train_file, expected_tokenizer_hash=self.tokenizer_hash)
            batches = BatchStream(
                train_tokens, config.block_size, config.batch_size, seed=config.seed
            )
        self.batches = batches
        if validation is None:
            val_tokens = TokenFile(val_file, expected_tokenizer_hash=self.tokenizer_hash)
            validation = ValidationSet(val_tokens, config.block_size, tokenizer)
        self.validation = validation
        self.optimizer = build_optimizer(self.model, config)
        self.scheduler = build_scheduler(self.optimizer, config)
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl")
        self.checkpoint_dir = self.out_dir / "checkpoints"
        # per-layer gate statistics of the hybrid layers, per step and per evaluation (chapter 15)
        self.gate_monitor = GateMonitor(self.model)

        self.step = 0  # optimizer steps taken (skipped non-finite steps included)
        self.tokens_seen = 0
        self.skipped_steps = 0
        self.bad_steps_in_row = 0
        self.train_seconds = 0.0  # wall-clock time spent training, summed over resumes
        self.resumed_from: Path | None = None
        self.changed_on_resume: dict[str, tuple[Any, Any]] = {}
        self.last_sample: str | None = None
        self.is_main = True  # the process that writes logs (rank 0 when distributed)
        self._resume_or_start_fresh(resume)

    def _resume_or_start_fresh(self, resume: bool) -> None:
        if resume and (checkpoint := latest_checkpoint(self.checkpoint_dir)) is not None:
            self.load(checkpoint)
        elif self.is_main:  # a fresh run starts fresh logs (leftovers of a run that never saved)
            self.metrics.path.unlink(missing_ok=True)
            (self.out_dir / "samples.txt").unlink(missing_ok=True)
            shutil.rmtree(self.out_dir / "tensorboard", ignore_errors=True)

    # ---------------------------------------------------------------- state for checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "data_position": self.batches.position,
            "skipped_steps": self.skipped_steps,
            "train_seconds": self.train_seconds,
            "rng": capture_rng_state(),
            "gate_monitor": self.gate_monitor.state_dict(),
            # fp16's loss scale (only then: other checkpoints keep their layout)
            **({"grad_scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
        }

    def _meta(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "data_position": self.batches.position,
            "model_config": self.model.config.to_dict(),
            "tokenizer_hash": self.tokenizer_hash,
            "train_config": dataclasses.asdict(self.config),
            "torch_version": torch.__version__,
        }

    def save(self) -> Path:
        """Write a checkpoint of the current step (atomically; see chapter 13)."""
        return save_checkpoint(
            self.checkpoint_dir, self.state_dict(), self._meta(), keep_last=self.config.keep_last
        )

    def load(self, checkpoint: str | Path) -> None:
        """Continue from ``checkpoint`` exactly where it was saved."""
        state, meta = load_checkpoint(checkpoint, map_location=self.device)
        check_compatible(
            meta,
            model_config=self.model.config.to_dict(),
            tokenizer_hash=self.tokenizer_hash,
            where=f"Checkpoint {checkpoint}",
        )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.apply_optimizer_settings(meta.get("train_config", {}))
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.batches.position = state["data_position"]
        self.skipped_steps = state["skipped_steps"]
        self.train_seconds = state["train_seconds"]
        if "gate_monitor" in state:  # checkpoints written before chapter 15 have no history
            self.gate_monitor.load_state_dict(state["gate_monitor"])
        if self.scaler is not None and state.get("grad_scaler"):  # the loss scale carries over
            self.scaler.load_state_dict(state["grad_scaler"])
        restore_rng_state(state["rng"])
        if self.is_main:
            self.metrics.truncate_after(self.step)
        self.resumed_from = Path(checkpoint)

    def apply_optimizer_settings(self, saved: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """After a resume, make this run's optimizer and schedule settings the ones in force.

        A checkpoint carries the optimizer's hyperparameters inside its state (and the schedule
        inside the scheduler's), so loading it would silently bring back the old ones — a lower
        ``train.lr`` after a divergence would do nothing. Here the moments and step counts stay,
        the settings come from ``self.config``. ``saved``: the checkpoint's ``train_config``;
        returns the settings that changed, ``{name: (old, new)}``, also kept as
        ``changed_on_resume`` (the training script prints them).
        """
        config = self.config
        schedule = _ScheduleMultiplier(config.warmup_steps, config.max_steps, config.min_lr_ratio)
        groups = self.optimizer.param_groups
        self.scheduler.lr_lambdas = [schedule] * len(groups)
        self.scheduler.base_lrs = [config.lr] * len(groups)
        for group in groups:
            group["initial_lr"] = config.lr
            group["lr"] = config.lr * schedule(self.scheduler.last_epoch)
            group["betas"] = (config.beta1, config.beta2)
            group["eps"] = config.eps
            if group.get("group_name") == "decay":
                group["weight_decay"] = config.weight_decay
        self.scheduler._last_lr = [group["lr"] for group in groups]
        changed = {
            name: (saved[name], getattr(config, name))
            for name in OPTIMIZER_SETTINGS
            if name in saved and saved[name] != getattr(config, name)
        }
        self.changed_on_resume = changed
        return changed

    # ---------------------------------------------------------------- one step
    def train_step(self) -> dict[str, float]:
        """One optimizer step over ``grad_accum_steps`` micro-batches; returns its numbers."""
        config = self.config
        parts_sum = {"loss": 0.0, "moe_aux_loss": 0.0, "gate_balance_loss": 0.0,
                     "gate_entropy_loss": 0.0}  # fmt: skip
        finite = True
        micro_batches = [self.batches.next_batch() for _ in range(config.grad_accum_steps)]
        # The chunked loss (12a) only when it is switched on: compute_loss(model, inputs, targets)
        # stays the call a test or a notebook can stand in for with a function of its own.
        loss_options = {"chunk_rows": config.loss_chunk_rows} if config.loss_chunk_rows else {}
        for (inputs, targets), lm_weight in zip(micro_batches, _token_weights(micro_batches)):
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            with _autocast(self.device, self.dtype):
                parts = compute_loss(self.model, inputs, targets, **loss_options)
            # The weight is exactly 1 for pretraining's full blocks (nothing changes then); with
            # fine-tuning's -100 labels it weighs this mean by its share of the scored tokens.
            lm = parts.lm * lm_weight
            total = parts.total + (lm_weight - 1) * parts.lm
            # Dividing each micro-batch's (weighted) mean by their number makes the summed
            # gradient the gradient of the mean over the whole step's tokens — one big batch.
            loss = total / config.grad_accum_steps
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            finite &= bool(torch.isfinite(total))
            for key, value in zip(parts_sum, (lm, parts.moe_aux, parts.gate_balance,
                                              parts.gate_entropy)):  # fmt: skip
                parts_sum[key] += float(value.detach()) / config.grad_accum_steps
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip and report the true gradient
        max_norm = config.grad_clip if config.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        # fp16's scaled gradients overflow now and then by design: the scaler skips that step
        # and lowers the scale. Only a non-finite *loss* counts towards divergence then.
        loss_finite = finite
        finite &= math.isfinite(grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        statistics = model_statistics(self.model)  # before the MoE load counters are reset
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the update itself if a gradient is inf/nan
            self.scaler.update()
        elif finite:
            self.optimizer.step()
        if finite:
            self.bad_steps_in_row = 0
        else:
            self.skipped_steps += 1
            if self.scaler is None or not loss_finite:  # not a mere fp16 gradient overflow
                self.bad_steps_in_row += 1
        self._update_moe_balance(apply_bias=finite)
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # after only skipped steps torch warns about the order
            warnings.filterwarnings("ignore", "Detected call of")
            self.scheduler.step()
        self.step += 1
        self.tokens_seen += config.tokens_per_step
        if self.bad_steps_in_row >= config.max_bad_steps:
            raise TrainingDivergedError(
                f"{self.bad_steps_in_row} steps in a row had a non-finite loss or gradient (last "
                f"at step {self.step}, lr {lr:.3g}). The run has diverged: lower train.lr or "
                "raise train.warmup_steps, keep train.grad_clip on, or use train.precision=fp32; "
                + self._restart_advice()
            )
        numbers = {**parts_sum, "grad_norm": grad_norm, "lr": lr, "skipped": not finite,
                   "statistics": statistics}  # fmt: skip
        if self.scaler is not None:
            numbers["loss_scale"] = float(self.scaler.get_scale())
        return numbers

    def _restart_advice(self) -> str:
        checkpoint = latest_checkpoint(self.checkpoint_dir)
        if checkpoint is None:
            return "no checkpoint was saved yet, so start over (--fresh)."
        return f"then resume from the last good checkpoint, {checkpoint}."

    def _update_moe_balance(self, *, apply_bias: bool) -> None:
        """Aux-loss-free balancing: nudge each router's expert bias after a real step.

        Either way the per-step load counters start from zero again, so the logged load is
        the last step's.
        """
        for module in self.model.modules():
            if isinstance(module, MoE):
                if apply_bias and module.router.use_bias:
                    module.update_expert_bias()
                else:
                    module.load_since_update.zero_()

    # ---------------------------------------------------------------- measuring
    def evaluate(self, max_blocks: int | None = -1) -> EvalResult:
        """Validation loss and bpc (``-1``: the periodic subset; ``None``: every block)."""
        blocks = (
            self.config.eval_batches * self.config.batch_size if max_blocks == -1 else max_blocks
        )
        return evaluate(
            self.model,
            self.validation,
            batch_size=self.config.batch_size,
            max_blocks=blocks,
            device=self.device,
            dtype=self.dtype,
        )

    def sample(self) -> str:
        return generate_sample(
            self.model,
            self.tokenizer,
            self.config.sample_prompt,
            max_new_tokens=self.config.sample_tokens,
            temperature=self.config.sample_temperature,
            seed=self.config.seed + self.step,
            device=self.device,
        )

    def _evaluate_and_report(
        self, last_train: dict[str, Any], writer, *, final: bool
    ) -> EvalResult:
        with self.gate_monitor.evaluating(self.step):
            result = self.evaluate(None if final else -1)
        text = self.sample() if self.config.sample_tokens else None  # 0: no sample
        record = {
            "kind": "eval",
            "step": self.step,
            "loss": last_train.get("loss"),
            "lr": last_train.get("lr"),
            "tokens": self.tokens_seen,
            "val_loss": result.loss,
            "val_bpc": result.bpc,
            "val_tokens": result.tokens,
            "final": final,
        }
        if self.gate_monitor.evaluations:
            gates = self.gate_monitor.evaluations[-1]
            for layer, mean, std in zip(gates.layers, gates.mean.tolist(), gates.std.tolist()):
                record[f"val_gate/layer{layer}/mean"] = mean
                record[f"val_gate/layer{layer}/std"] = std
        self.last_sample = text
        if not self.is_main:
            return result
        self.metrics.append(record)
        if text is not None:
            with open(self.out_dir / "samples.txt", "a", encoding="utf-8") as handle:
                handle.write(f"--- step {self.step}, val_loss {result.loss:.4f}\n{text}\n\n")
        if writer is not None:
            writer.add_scalar("val/loss", result.loss, self.step)
            writer.add_scalar("val/bpc", result.bpc, self.step)
            if text is not None:
                writer.add_text("sample", text, self.step)
            writer.flush()
        plot_loss_curve(self.metrics.read(), self.out_dir / "loss_curve.png")
        plot_gate_heatmaps(self.gate_monitor, self.out_dir / "gate_heatmaps.png")
        if self.verbose:
            tqdm.write(
                f"step {self.step:>5} | train loss {record['loss']:.3f} | val loss "
                f"{result.loss:.3f} | val bpc {result.bpc:.3f}" + (" (all blocks)" if final else "")
            )
        return result

    def _tensorboard(self):
        if not self.config.tensorboard or not self.is_main:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=self.step or None)

    # ---------------------------------------------------------------- the loop
    def fit(
        self,
        *,
        stop_at: int | None = None,
        export: bool = True,
        on_step: Callable[[Trainer, dict[str, Any]], None] | None = None,
    ) -> TrainResult:
        """Train until ``config.max_steps`` (or ``stop_at``, a pause: save and return).

        At the end (``max_steps``): a final evaluation on the whole validation file, a sample, a
        checkpoint and, with ``export``, the Hugging Face folder ``out_dir/model``. On SIGTERM or
        SIGINT: the current step finishes, a checkpoint is saved, and ``fit`` returns with
        ``stopped_by`` set to the signal's name.
        """
        config = self.config
        target = config.max_steps if stop_at is None else min(stop_at, config.max_steps)
        writer = self._tensorboard()
        bar = tqdm(total=config.max_steps, initial=self.step, desc="train", unit="step",
                   disable=not self.progress, dynamic_ncols=True)  # fmt: skip
        stopped_by = "max_steps" if target == config.max_steps else "stop_at"
        last: dict[str, Any] = {}
        final_eval = None
        window_tokens, window_start = 0, time.perf_counter()
        try:
            with StopRequest().installed() as stop:
                while self.step < target:
                    step_start, tokens_before = time.perf_counter(), self.tokens_seen
                    numbers = self.train_step()
                    self.gate_monitor.end_step(self.step)
                    self.train_seconds += time.perf_counter() - step_start
                    window_tokens += self.tokens_seen - tokens_before  # all ranks together
                    last = {"loss": numbers["loss"], "lr": numbers["lr"]}
                    bar.update(1)
                    if self.step % config.log_every == 0 or self.step == target:
                        elapsed = time.perf_counter() - window_start
                        record = self._train_record(numbers, window_tokens / max(elapsed, 1e-9))
                        if self.is_main:
                            self.metrics.append(record)
                        if writer is not None:
                            for key, value in record.items():
                                if key not in ("kind", "step"):
                                    writer.add_scalar(f"train/{key}", value, self.step)
                        bar.set_postfix(loss=f"{numbers['loss']:.3f}",
                                        tok_s=f"{record['tokens_per_s']:.0f}",
                                        lr=f"{numbers['lr']:.2e}")  # fmt: skip
                        window_tokens, window_start = 0, time.perf_counter()
                    if on_step is not None:
                        on_step(self, numbers)
                    finishing = self.step == config.max_steps
                    signal_name = self._stop_requested(stop)
                    if finishing or (self.step % config.eval_every == 0 and not signal_name):
                        final_eval = self._evaluate_and_report(last, writer, final=finishing)
                    if signal_name:
                        stopped_by = signal_name
                        break
                    if self.step % config.save_every == 0 and not finishing:
                        self.save()
                checkpoint = self.save() if self.step > 0 else None
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        exported = None
        if export and stopped_by == "max_steps":
            exported = self.export(self.out_dir / "model", final_eval)
        return TrainResult(
            step=self.step,
            tokens=self.tokens_seen,
            stopped_by=stopped_by,
            checkpoint=checkpoint,
            final_eval=final_eval if stopped_by == "max_steps" else None,
            export=exported,
            seconds=self.train_seconds,
            skipped_steps=self.skipped_steps,
            records=self.metrics.read(),
        )

    def _stop_requested(self, stop: StopRequest) -> str | None:
        """The signal that asks this run to stop, if any (distributed runs agree across ranks)."""
        return stop.signal_name

    def export(self, directory: str | Path, final_eval: EvalResult | None = None) -> Path:
        """Write the model as a Hugging Face folder (safetensors, its code, a model card with
        this run's settings and ``final_eval``) into ``directory``."""
        return export_pretrained(
            self.model, self.tokenizer, directory, training=self.card_facts(final_eval)
        ).path

    def card_facts(self, final_eval: EvalResult | None = None) -> dict[str, str]:
        """What the model card says about this run (``hub.write_model_card``)."""
        config = self.config
        facts = {
            "steps": f"{self.step:,}",
            "tokens seen": f"{self.tokens_seen:,}",
            "sequence length": str(config.block_size),
            "sequences per step": f"{config.batch_size} × {config.grad_accum_steps} accumulation",
            "optimizer": f"AdamW, peak lr {config.lr:g}, {config.warmup_steps} warm-up steps, "
            f"weight decay {config.weight_decay:g}",
            "precision": str(self.compute_dtype).removeprefix("torch."),
        }
        if final_eval is not None:
            facts["validation loss"] = f"{final_eval.loss:.4f} nats per token"
            facts["validation bits per character"] = f"{final_eval.bpc:.4f}"
        return facts

    def _train_record(self, numbers: dict[str, Any], tokens_per_s: float) -> dict[str, Any]:
        record = {
            "kind": "train",
            "step": self.step,
            "loss": numbers["loss"],
            "lr": numbers["lr"],
            "tokens": self.tokens_seen,
            "grad_norm": numbers["grad_norm"],
            "tokens_per_s": tokens_per_s,
            "epoch": self.batches.epoch,
            "skipped_steps": self.skipped_steps,
        }
        if "loss_scale" in numbers:  # fp16: the scaler's current multiplier
            record["loss_scale"] = numbers["loss_scale"]
        for key in ("moe_aux_loss", "gate_balance_loss", "gate_entropy_loss"):
            if numbers[key]:
                record[key] = numbers[key]
        record.update(numbers["statistics"])
        monitor = self.gate_monitor
        if monitor.steps and monitor.steps[-1] == self.step:  # this step over all micro-batches
            for layer, mean, std in zip(
                monitor.layers, monitor.step_mean[-1], monitor.step_std[-1]
            ):
                record[f"gate/layer{layer}/mean"] = mean
                record[f"gate/layer{layer}/std"] = std
        return record


def _resolve_device(name: str) -> torch.device:
    from .model_folder import device_named
    from .utils import pick_device

    return pick_device() if name == "auto" else device_named(name)
