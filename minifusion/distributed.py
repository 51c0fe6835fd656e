"""Chapter 14 — the same training loop on many processes, with DeepSpeed ZeRO.

:class:`DeepSpeedTrainer` is chapter 12's :class:`~minifusion.training.Trainer` with four parts
swapped out; everything else (data order, schedule, evaluation cadence, metrics) is inherited:

* **the step** — ``engine.backward`` / ``engine.step``: DeepSpeed averages gradients across
  ranks, applies accumulation and clipping as ``deepspeed_config`` told it (from the one
  ``TrainConfig``), and shards what the ZeRO stage shards;
* **the data** — rank ``r`` of ``W`` reads every ``W``-th slice of the same batch stream, so the
  global batch of ``W`` ranks is the batch one process with ``W×`` the batch size would read
  (a streamed corpus is split between ranks by documents or shards instead);
* **checkpoints** — every rank writes its shard through ``engine.save_checkpoint`` into a
  hidden temporary folder; when all have finished, rank 0 writes ``meta.json`` and renames the
  folder into place, so an interrupted save is never mistaken for a checkpoint;
* **agreement** — evaluation is sharded over ranks and summed; a stop signal on any rank stops
  all of them after the same step (one ``all_reduce`` per step).

Launch: ``torchrun --nproc_per_node=N -m minifusion.train --config ... --deepspeed
configs/deepspeed/zero2.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .checkpoint import (
    CheckpointError,
    capture_rng_state,
    check_compatible,
    complete_checkpoint,
    export_pretrained,
    latest_checkpoint,
    read_meta,
    restore_rng_state,
    step_dir_name,
)
from .extensions import (  # re-exported: DeepSpeed runs are where these first mattered
    StaleBuildLockError,
    build_extensions,
    check_build_locks,
    environment_build_tools,
)
from .training import (
    EvalResult,
    StopRequest,
    TrainConfig,
    Trainer,
    TrainingDivergedError,
    compute_loss,
    validation_sums,
)
from .utils import fsync_dir, fsync_tree
from .zero import deepspeed_config

__all__ = [
    "DeepSpeedTrainer",
    "StaleBuildLockError",
    "build_extensions",
    "check_build_locks",
    "export_zero_checkpoint",
    "finish_distributed",
    "init_distributed",
    "model_from_zero_checkpoint",
    "universal_checkpoint",
]

ENGINE_TAG = "deepspeed"  # DeepSpeed's own folder inside one of our checkpoint folders
UNIVERSAL_TAG = "universal"  # the same state re-laid out per parameter, for another world size
GATE_MONITOR_FILE = "gate_monitor.pt"  # the gate statistics' history (minifusion.monitor)
DEEPSPEED_FORMAT = "minifusion-deepspeed-checkpoint-1"


def init_distributed() -> tuple[int, int, torch.device]:
    """Join the process group torchrun set up; returns ``(rank, world_size, device)``.

    NCCL on CUDA machines (one GPU per process, chosen by ``LOCAL_RANK``), gloo on CPUs.
    Raises :class:`StaleBuildLockError` instead of hanging on a build lock a killed process
    left behind.
    """
    check_build_locks()
    import deepspeed

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        with environment_build_tools():  # on CPUs DeepSpeed loads (or builds) its comm op here
            deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


# The handle of the last barrier, held until the process ends (see finish_distributed).
_FINAL_BARRIER: list[dist.Work] = []


def finish_distributed() -> None:
    """Leave the process group together: wait for every rank, then tear the group down.

    The barrier's handle is kept for the rest of the process, and that matters on CPUs. Gloo
    runs each collective on a worker thread, and whoever drops the last reference to a finished
    collective frees its tensors, which takes the GIL. A barrier's work also holds the
    collectives still running when it was queued (ZeRO's gathers, say). If the worker thread
    drops that work last while the main thread is already shutting the interpreter down, Python
    ends the thread inside a C++ destructor and the process aborts: "terminate called without
    an active exception", exit code −6, after all its work is saved, and torchrun reports the
    whole run as failed (core dumps of reproduced aborts show this stack). Holding the
    handle leaves that last release to the main thread.
    """
    if dist.is_initialized():
        barrier = dist.barrier(async_op=True)
        barrier.wait()
        _FINAL_BARRIER.append(barrier)
        dist.destroy_process_group()


class DeepSpeedTrainer(Trainer):
    """:class:`~minifusion.training.Trainer` on every rank of a DeepSpeed ZeRO run.

    Args are the Trainer's, plus ``deepspeed_config_path`` (a ``configs/deepspeed/*.json``).
    Only rank 0 shows progress, writes logs, samples and exports.
    """

    def __init__(
        self,
        model,
        tokenizer,
        train_file,
        val_file,
        config: TrainConfig,
        out_dir,
        *,
        deepspeed_config_path: str | Path,
        resume: bool = True,
        progress: bool = True,
        verbose: bool = True,
        batches=None,
    ):
        import deepspeed

        self.rank, self.world_size, device = init_distributed()
        config = dataclasses.replace(config, device=str(device))
        self._resume_requested = resume
        super().__init__(model, tokenizer, train_file, val_file, config, out_dir,
                         resume=False, progress=progress and self.rank == 0,
                         verbose=verbose and self.rank == 0, batches=batches)  # fmt: skip
        self.is_main = self.rank == 0
        if config.loss_chunk_rows:
            raise ValueError(
                f"train.loss_chunk_rows={config.loss_chunk_rows} is for single-process training: "
                "under DeepSpeed the loss is computed through the engine (whose ZeRO-3 stage "
                "keeps the head's weight partitioned). Set train.loss_chunk_rows=0 under torchrun."
            )
        if self.dtype == torch.float16:
            # DeepSpeed's torch_autocast scales the loss only without ZeRO; fp16 under ZeRO would
            # lose small gradients silently. `auto` on a GPU without bf16 trains in fp32 here.
            if config.precision == "fp16":
                raise ValueError(
                    "train.precision=fp16 is for single-process training: DeepSpeed's ZeRO "
                    "stages do not scale an autocast loss. Use train.precision=bf16 (Ampere GPUs "
                    "and newer) or fp32 under torchrun."
                )
            self.dtype, self.scaler = None, None
            if self.is_main:
                print("this GPU has no bf16: DeepSpeed runs train in fp32 (precision=auto)")
        self.batches.rank, self.batches.world_size = self.rank, self.world_size
        self.gate_monitor.reduce = dist.all_reduce  # gate sums over every rank's tokens
        self.ds_config = deepspeed_config(
            deepspeed_config_path, config, world_size=self.world_size, autocast_dtype=self.dtype
        )
        self.zero_stage = self.ds_config["zero_optimization"]["stage"]
        for group in self.optimizer.param_groups:  # DeepSpeed wants plain groups
            group.pop("param_names", None)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model,
            optimizer=self.optimizer,
            lr_scheduler=self.scheduler,
            config=self.ds_config,
        )
        self.compute_dtype = self.dtype  # what the forward pass computes in, for reports
        self.dtype = None  # the engine applies autocast itself (torch_autocast in its config)
        self._really_resume_or_start_fresh()

    # ---------------------------------------------------------------- lifecycle
    def _resume_or_start_fresh(self, resume: bool) -> None:
        pass  # deferred until the engine exists

    def _really_resume_or_start_fresh(self) -> None:
        latest = latest_checkpoint(self.checkpoint_dir)
        if self._resume_requested and latest is not None:
            self.load(latest)
        elif self.is_main:
            super()._resume_or_start_fresh(False)
        dist.barrier()

    # ---------------------------------------------------------------- the step
    def train_step(self) -> dict[str, float]:
        config = self.config
        losses = torch.zeros(4, dtype=torch.float64)
        for _ in range(config.grad_accum_steps):
            inputs, targets = (t.to(self.device) for t in self.batches.next_batch())
            parts = compute_loss(self.engine, inputs, targets)
            # A non-finite loss makes non-finite gradients; DeepSpeed then finds the global
            # gradient norm invalid (the same on every rank) and skips the optimizer step.
            self.engine.backward(parts.total)  # DeepSpeed divides by grad_accum_steps
            values = [parts.lm, parts.moe_aux, parts.gate_balance, parts.gate_entropy]
            losses += torch.tensor([float(v.detach()) for v in values], dtype=torch.float64)
            self.engine.step()  # an optimizer step only at the accumulation boundary
        finite = self.engine.was_step_applied()
        # The same aux-loss-free balancing as on one device (each rank's expert load is summed
        # over all ranks inside MoE.update_expert_bias, so every rank moves its bias alike).
        self._update_moe_balance(apply_bias=finite)
        if not finite:
            self.scheduler.step()  # DeepSpeed holds the schedule on a skipped step; ours moves on
        dist.all_reduce(losses)
        losses /= self.world_size * config.grad_accum_steps
        lr = self.optimizer.param_groups[0]["lr"]
        norm = self.engine.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else float("nan")
        self.step += 1
        self.tokens_seen += config.tokens_per_step * self.world_size
        if finite:
            self.bad_steps_in_row = 0
        else:
            self.skipped_steps += 1
            self.bad_steps_in_row += 1
            if self.bad_steps_in_row >= config.max_bad_steps:
                raise TrainingDivergedError(
                    f"{self.bad_steps_in_row} steps in a row had a non-finite loss or gradient "
                    f"(last at step {self.step}). Lower train.lr or raise train.warmup_steps; "
                    + self._restart_advice()
                )
        names = ("loss", "moe_aux_loss", "gate_balance_loss", "gate_entropy_loss")
        numbers = dict(zip(names, losses.tolist()))
        return {**numbers, "grad_norm": grad_norm, "lr": lr, "skipped": not finite,
                "statistics": {}}  # fmt: skip

    def _stop_requested(self, stop: StopRequest) -> str | None:
        flag = torch.tensor([1 if stop.signal_name else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not bool(flag):
            return None
        return stop.signal_name or "signal on another rank"

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, max_blocks: int | None = -1) -> EvalResult:
        """Validation over blocks shared out across ranks, summed with ``all_reduce``."""
        config = self.config
        blocks = config.eval_batches * config.batch_size if max_blocks == -1 else max_blocks
        everything = self.validation.indices(blocks)
        # Every rank runs the same number of forward passes (ZeRO-3 gathers need all ranks).
        per_rank = math.ceil(len(everything) / self.world_size)
        sums = validation_sums(self.engine, self.validation, everything[self.rank :: self.world_size],
                               batch_size=config.batch_size, device=self.device,
                               dtype=self._eval_dtype(),
                               forward_passes=math.ceil(per_rank / config.batch_size))  # fmt: skip
        totals = torch.tensor(sums, dtype=torch.float64)
        dist.all_reduce(totals)
        return EvalResult.from_sums(*totals.tolist())

    def _eval_dtype(self) -> torch.dtype | None:
        autocast = self.ds_config.get("torch_autocast", {})
        return torch.bfloat16 if autocast.get("enabled") else None

    def sample(self) -> str:
        if self.zero_stage == 3:
            return (
                "(samples are skipped under ZeRO-3: generation would gather every layer per token)"
            )
        return super().sample()

    # ---------------------------------------------------------------- checkpoints
    def save(self) -> Path:
        """Every rank writes its shard; rank 0 completes the folder and renames it into place."""
        final = self.checkpoint_dir / step_dir_name(self.step)
        if final.is_dir():
            return final
        tmp = self.checkpoint_dir / f".tmp-{step_dir_name(self.step)}"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        self.engine.save_checkpoint(str(tmp), tag=ENGINE_TAG, save_latest=False)
        torch.save(capture_rng_state(), tmp / f"rng_rank{self.rank}.pt")
        if self.is_main:  # the same on every rank (its sums are reduced across ranks)
            torch.save(self.gate_monitor.state_dict(), tmp / GATE_MONITOR_FILE)
        dist.barrier()  # every shard is written ...
        # ... and flushed to disk by every rank (DeepSpeed's torch.save does not fsync; on a
        # shared file system each node flushes what it wrote — and, harmlessly, the rest).
        fsync_tree(tmp)
        dist.barrier()
        if self.is_main:
            files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*"))
                     if p.is_file()}  # fmt: skip
            meta = {**self._meta(), "format": DEEPSPEED_FORMAT,
                    "world_size": self.world_size, "zero_stage": self.zero_stage,
                    "skipped_steps": self.skipped_steps, "train_seconds": self.train_seconds,
                    "files": files}  # fmt: skip
            complete_checkpoint(tmp, final, meta, keep_last=self.config.keep_last)
        dist.barrier()
        return final

    def load(self, checkpoint: str | Path) -> None:
        """Restore a checkpoint written by this many processes — or by any other number.

        Same world size: each rank reads back its own shard. Another world size: the shards are
        first merged into DeepSpeed's *universal* layout (one folder per parameter holding its
        fp32 weight, ``exp_avg``, ``exp_avg_sq`` and step), once, next to the original; every rank
        then cuts its new shard out of that, so weights and optimizer state carry over exactly.
        """
        checkpoint = Path(checkpoint)
        meta = _read_deepspeed_meta(checkpoint)
        check_compatible(meta, model_config=self.model.config.to_dict(),
                         tokenizer_hash=self.tokenizer_hash, where=f"Checkpoint {checkpoint}")  # fmt: skip
        saved_world = meta["world_size"]
        if saved_world == self.world_size:
            self.engine.load_checkpoint(str(checkpoint), tag=ENGINE_TAG)
        else:
            if self.is_main:
                print(f"      {checkpoint.name} was written by {count_processes(saved_world)}; "
                      f"re-sharding it for {self.world_size} (DeepSpeed universal checkpoint)")  # fmt: skip
                universal_checkpoint(checkpoint)
            dist.barrier()
            self._load_universal(checkpoint)
        self.apply_optimizer_settings(meta.get("train_config", {}))
        self.step, self.tokens_seen = meta["step"], meta["tokens_seen"]
        self.batches.position = meta["data_position"]
        self.skipped_steps, self.train_seconds = meta["skipped_steps"], meta["train_seconds"]
        # A rank that did not exist in the saved run borrows an existing rank's random streams.
        rng = checkpoint / f"rng_rank{self.rank % saved_world}.pt"
        restore_rng_state(torch.load(rng, weights_only=True))
        if (checkpoint / GATE_MONITOR_FILE).is_file():
            self.gate_monitor.load_state_dict(
                torch.load(checkpoint / GATE_MONITOR_FILE, weights_only=True),
                pending=self.is_main,  # rank 0's unreduced sums, added back in once
            )
        if self.is_main:
            self.metrics.truncate_after(self.step)
        self.resumed_from = checkpoint

    def _load_universal(self, checkpoint: Path) -> None:
        from deepspeed.utils import logger

        config = self.engine._config  # DeepSpeed reads this switch at load time only
        config.load_universal_checkpoint = True
        level = logger.level
        logger.setLevel(logging.ERROR)  # "MPU is not provided": we use no tensor parallelism
        try:
            self.engine.load_checkpoint(str(checkpoint), tag=UNIVERSAL_TAG)
        finally:
            config.load_universal_checkpoint = False
            logger.setLevel(level)
        self._restore_buffers(checkpoint)

    def _restore_buffers(self, checkpoint: Path) -> None:
        """Copy the module's buffers (the MoE routers' ``expert_bias``) from the original shards.

        The universal layout holds parameters and optimizer state only, so a resume at another
        world size would otherwise restart every buffer from its initial value. Buffers are the
        same on every rank; each shard's model-states file lists them (``buffer_names``).
        """
        shard = next((checkpoint / ENGINE_TAG).glob("*model_states.pt"))
        saved = torch.load(shard, map_location="cpu", weights_only=True)
        buffers = dict(self.model.named_buffers())
        with torch.no_grad():
            for name in saved.get("buffer_names", []):
                buffers[name].copy_(saved["module"][name])

    def training_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every parameter's full fp32 master weight and Adam moments, gathered from all shards.

        ``{name: {"fp32": W, "exp_avg": m, "exp_avg_sq": v}}`` on the CPU, the same on every
        rank. A collective call: every rank must make it. Used to check that a resume at
        another world size carries the state over unchanged.
        """
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        optimizer = self.engine.optimizer
        if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
            # ZeRO-1/2 point each parameter at its slice of the Adam moments only after a step;
            # after loading a checkpoint nothing has stepped yet, so make the links now.
            optimizer._hp_optimizer_states_linked = False
            optimizer._lazy_init_hp_params_optimizer_state()
        state = {}
        for name, param in self.engine.module.named_parameters():
            state[name] = {
                "fp32": safe_get_full_fp32_param(param).detach().cpu().clone(),
                **{key: safe_get_full_optimizer_state(param, key).detach().cpu().clone()
                   for key in ("exp_avg", "exp_avg_sq")},
            }  # fmt: skip
        return state

    def export(self, directory: str | Path, final_eval=None) -> Path:
        """Rank 0 rebuilds full fp32 weights from the newest checkpoint and exports them, with
        a model card stating this run's settings and ``final_eval``."""
        checkpoint = latest_checkpoint(self.checkpoint_dir)
        if self.is_main:
            export_zero_checkpoint(checkpoint, self.model.config, self.tokenizer, directory,
                                   training=self.card_facts(final_eval))  # fmt: skip
        dist.barrier()
        return Path(directory)


def count_processes(n: int) -> str:
    """``"1 process"``, ``"2 processes"``."""
    return f"{n} process" + ("es" if n != 1 else "")


def _read_deepspeed_meta(checkpoint: Path) -> dict[str, Any]:
    meta = read_meta(checkpoint, formats=(DEEPSPEED_FORMAT,))
    missing = [name for name, size in meta["files"].items()
               if not (checkpoint / name).is_file() or (checkpoint / name).stat().st_size != size]  # fmt: skip
    if missing:
        raise CheckpointError(
            f"{checkpoint} is incomplete or damaged: {missing[:4]} missing or of the wrong size. "
            "Delete it to resume from the previous checkpoint."
        )
    return meta


def model_from_zero_checkpoint(checkpoint: str | Path, model_config):
    """A ``MiniFusionForCausalLM`` with the full fp32 weights of a DeepSpeed checkpoint.

    The shards (any ZeRO stage, any world size) are merged with DeepSpeed's ``zero_to_fp32``
    helper, on the CPU, without starting a process group — so it also works on a laptop after
    the run. Raises :class:`CheckpointError` if the weights do not fit ``model_config``.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from .model import MiniFusionForCausalLM

    with contextlib.redirect_stdout(io.StringIO()):  # it narrates every stage on stdout
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=ENGINE_TAG)
    model = MiniFusionForCausalLM(model_config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embedding
    if missing or unexpected:
        raise CheckpointError(
            f"{checkpoint} does not match the model: missing {missing[:4]}, unexpected "
            f"{unexpected[:4]}."
        )
    return model


def export_zero_checkpoint(
    checkpoint: str | Path, model_config, tokenizer, directory,
    training: dict[str, str] | None = None,
) -> Path:  # fmt: skip
    """A Hugging Face folder (safetensors) from a DeepSpeed checkpoint of any ZeRO stage;
    ``training`` is the model card's table of run facts (see ``export_pretrained``)."""
    model = model_from_zero_checkpoint(checkpoint, model_config)
    return export_pretrained(model, tokenizer, directory, training=training).path


def universal_checkpoint(checkpoint: str | Path) -> Path:
    """Convert ``<checkpoint>/deepspeed`` (shards for N ranks) to ``<checkpoint>/universal``.

    DeepSpeed's ``ds_to_universal`` merges the ZeRO shards into one folder per parameter
    (``fp32.pt``, ``exp_avg.pt``, ``exp_avg_sq.pt``, ``step.pt``), which any number of ranks can
    load. Runs in this process, without a process group; done once per checkpoint, written under
    a temporary name and renamed, so a crash mid-conversion leaves nothing half-made behind.
    Returns the universal folder.
    """
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    checkpoint = Path(checkpoint)
    final = checkpoint / UNIVERSAL_TAG
    if final.is_dir():
        return final
    tmp = checkpoint / f".tmp-{UNIVERSAL_TAG}"
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(checkpoint / ENGINE_TAG), output_folder=str(tmp),
        num_extract_workers=1, num_merge_workers=1,  # no worker processes inside a launched rank
        keep_temp_folder=False, strict=True, inject_missing_state=True,
    )  # fmt: skip
    chatter = io.StringIO()  # the converter prints every stage and draws progress bars
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            ds_to_universal(args)
    except Exception as error:
        raise CheckpointError(
            f"Could not convert {checkpoint} to DeepSpeed's universal format ({error}). Resume "
            f"with the world size that wrote it.\n{chatter.getvalue()[-2000:]}"
        ) from error
    (checkpoint / "latest_universal").unlink(missing_ok=True)  # we always name the tag
    fsync_tree(tmp)
    os.rename(tmp, final)
    fsync_dir(checkpoint)
    return final
