"""The pretraining script — chapter 12's loop and chapter 13's checkpoints behind one command.

::

    python -m minifusion.train --config configs/tiny.yaml --out runs/tiny
    python -m minifusion.train --config configs/tiny.yaml --out runs/tiny --set train.max_steps=400
    python -m minifusion.train --config configs/tiny.yaml --out runs/tiny --fresh
    python -m minifusion.train --config configs/fusiontree-1.5b.yaml --out runs/ft --dry-run \
        --deepspeed configs/deepspeed/zero2.json --gpus 8

A preset has three sections: ``model:`` (any ``MiniFusionConfig`` field), ``data:`` (corpus,
validation share, block size; ``streaming: true`` to read a corpus too big for the disk lazily,
split between ranks) and ``train:`` (any ``TrainConfig`` field). ``--set
section.name=value`` overrides one entry, converted by the type of the field it sets
(:mod:`minifusion.settings`: ``3e-4``, ``true``, ``[a, b]``; text stays as typed, so
``train.sample_prompt=ROMEO:`` is the prompt ``ROMEO:``). The resolved settings are written to ``<out>/config.yaml``.

Running the same command again continues from the newest checkpoint in ``<out>``; ``--fresh``
deletes the run's checkpoints and logs first (the prepared data is kept and reused).
``--dry-run`` prints the resolved settings, the memory each GPU will need and the tokens/s to
expect (an estimate from the model's FLOPs at an assumed utilisation of the GPU's peak:
``--peak-tflops``, ``--mfu``), then exits: no data, no model, nothing written.
"""

from __future__ import annotations

import argparse
import builtins
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from .checkpoint import CheckpointError, file_in_the_way, remove_run_outputs
from .config import MiniFusionConfig
from .data import PreparedStream, preparation_for
from .distributed import StaleBuildLockError
from .host_memory import reuse_freed_memory
from .model_folder import device_named
from .settings import apply_overrides, load_settings  # noqa: F401  (apply_overrides: re-export)
from .tokenizer import load_tokenizer
from .training import StreamingBatches, TrainConfig, Trainer, TrainingDivergedError
from .utils import seed_everything

RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "tensorboard", "loss_curve.png", "samples.txt",
               "model")  # fmt: skip
# --dry-run's throughput estimate: an A100's dense bf16 tensor-core peak (NVIDIA's A100
# datasheet: 312 TFLOPS, 624 with 2:4 sparsity) and an assumed share of it (PaLM reports 46 %
# MFU, Chowdhery et al., 2022; small models, and Mamba's scan without its CUDA kernel, reach less).
A100_BF16_TFLOPS = 312.0
DEFAULT_MFU = 0.4


def start_fresh(out_dir: Path) -> None:
    """Delete a run's checkpoints and logs; keep the prepared tokenizer and token files."""
    remove_run_outputs(out_dir, RUN_OUTPUTS)


def _silent(*args: Any, **kwargs: Any) -> None:
    """``print`` on ranks other than 0."""


def _barrier(args: argparse.Namespace) -> None:
    if args.deepspeed:
        import torch.distributed as dist

        dist.barrier()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m minifusion.train",
        description="Train a MiniFusion model; rerun the same command to resume.",
    )
    parser.add_argument("--config", required=True, help="preset YAML, e.g. configs/tiny.yaml")
    parser.add_argument("--out", required=True, help="run folder (data, checkpoints, logs)")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[],
                        metavar="SECTION.NAME=VALUE", help="override settings: several after one "
                        "--set (--set train.lr=1e-3 train.max_steps=400), or --set repeated")  # fmt: skip
    parser.add_argument("--fresh", action="store_true",
                        help="start over: delete this run's checkpoints and logs")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--stop-at", type=int, metavar="STEP",
                        help="pause after this step: save a checkpoint and exit (rerun to go on)")  # fmt: skip
    parser.add_argument("--deepspeed", metavar="JSON",
                        help="train with DeepSpeed ZeRO (configs/deepspeed/zero{1,2,3}.json); "
                        "launch with torchrun --nproc_per_node=N")  # fmt: skip
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved settings and the memory per GPU, then exit "
                        "(allocates no model, writes nothing)")  # fmt: skip
    parser.add_argument("--gpus", type=int, metavar="N",
                        help="GPUs that --dry-run plans for (default: $WORLD_SIZE, else 1)")  # fmt: skip
    parser.add_argument("--peak-tflops", type=float, default=A100_BF16_TFLOPS, metavar="T",
                        help="--dry-run's tokens/s estimate: one GPU's dense bf16 peak in TFLOPS "
                        f"(default {A100_BF16_TFLOPS:g}: an A100; an H100 SXM has 989)")  # fmt: skip
    parser.add_argument("--mfu", type=float, default=DEFAULT_MFU, metavar="FRACTION",
                        help="--dry-run's tokens/s estimate: the share of that peak a training "
                        f"step is assumed to reach (default {DEFAULT_MFU:g})")  # fmt: skip
    args = parser.parse_args(argv)
    if args.stop_at is not None and args.stop_at < 1:
        parser.error(f"--stop-at must be a step ≥ 1, not {args.stop_at}.")
    if problem := file_in_the_way(args.out, "a run folder holds the data, checkpoints and logs"):
        parser.error(problem)
    try:
        if args.dry_run:
            return dry_run(args)
        return run(args)
    except yaml.YAMLError as error:  # the preset itself: where it stops parsing, and why
        print(f"error: {args.config} is not valid YAML:\n{error}", file=sys.stderr)
        return 1
    except (CheckpointError, StaleBuildLockError, TrainingDivergedError, ValueError,
            FileNotFoundError, IsADirectoryError) as error:  # fmt: skip
        print(f"error: {error}", file=sys.stderr)
        return 1


def _precision_name(dtype) -> str:
    """How ``[2/4]`` names the precision a trainer computes in."""
    if dtype is None:
        return "fp32"
    return "fp16 autocast, loss scaling" if dtype == torch.float16 else "bf16 autocast"


def dry_run(args: argparse.Namespace) -> int:
    """Print what a run of ``args`` would train, the memory per GPU and the tokens/s to expect,
    without starting it.

    The model's parameters are counted from its config; only the activations are measured, on
    one layer of each kind at ≤ 512 tokens (``minifusion.zero.activation_bytes_per_token``).
    Tokens/s are estimated, not measured: :func:`training_flops_per_token` at ``args.mfu`` of
    ``args.peak_tflops``.
    """
    from .zero import activation_bytes_per_token, memory_per_gpu

    settings = load_settings(args.config, args.overrides)
    train_config = TrainConfig.from_dict(settings["train"])
    model_config = MiniFusionConfig.from_section(settings["model"], where=str(args.config))
    check_block_fits(model_config, train_config)
    gpus = args.gpus if args.gpus is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if gpus < 1:
        raise ValueError(f"--gpus must be ≥ 1 (got {gpus}).")
    model_flops = training_flops_per_token(model_config, train_config.block_size)
    flops = training_flops_per_token(model_config, train_config.block_size,
                                     train_config.gradient_checkpointing)  # fmt: skip
    rate = expected_tokens_per_second(flops, peak_tflops=args.peak_tflops, mfu=args.mfu)
    stage = 0
    if args.deepspeed:
        from .zero import deepspeed_config

        stage = deepspeed_config(args.deepspeed, train_config, world_size=gpus,
                                 autocast_dtype=None)["zero_optimization"]["stage"]  # fmt: skip
    print(f"# {args.config}, resolved ({len(args.overrides)} override(s)); a run writes this "
          f"to {Path(args.out) / 'config.yaml'}")  # fmt: skip
    print(yaml.safe_dump(settings, sort_keys=False).rstrip())
    total, active = model_config.estimate_parameters(), model_config.estimate_active_parameters()
    tokens = train_config.tokens_per_step * gpus
    print(f"# model: {total:,} parameters ({active:,} active per token), counted from the "
          "config: nothing allocated")  # fmt: skip
    print(f"# one step: {train_config.batch_size} sequences × {train_config.block_size:,} tokens "
          f"× {train_config.grad_accum_steps} accumulation × {gpus} GPU(s) = {tokens:,} tokens; "
          f"{train_config.max_steps:,} steps = {tokens * train_config.max_steps:,} tokens")  # fmt: skip
    checkpointing = train_config.gradient_checkpointing  # False | "layers" | "branches"
    per_token = activation_bytes_per_token(model_config,
                                           seq_len=min(train_config.block_size, 512),
                                           checkpoint_branches=checkpointing == "branches")  # fmt: skip
    estimate = memory_per_gpu(
        model_config, stage=stage, gpus=gpus, batch_size=train_config.batch_size,
        seq_len=train_config.block_size,
        activation_checkpointing=checkpointing == "layers",
        activation_bytes=per_token * model_config.num_hidden_layers,
    )  # fmt: skip
    gib = 2**30
    setup = f"ZeRO-{stage}" if args.deepspeed else "no DeepSpeed (plain loop, ZeRO-0 figures)"
    recompute = {False: "off", "layers": "on (whole layers)", "branches": "on (branches only)"}
    print(f"# memory per GPU, {setup} on {gpus} GPU(s), activation checkpointing "
          f"{recompute[checkpointing]}:")  # fmt: skip
    for name in ("parameters", "gradients", "master", "optimizer", "activations"):
        print(f"#   {name:<12} {getattr(estimate, name) / gib:8.2f} GiB")
    print(f"#   {'total':<12} {estimate.total / gib:8.2f} GiB  (+10–20 % for buffers and "
          "fragmentation; activations measured on one layer of each kind)")  # fmt: skip
    share = f"{args.mfu * 100:g} %"
    if flops > model_flops:  # MFU counts model FLOPs only, so recomputation lowers it
        share += f" of the peak ({args.mfu * model_flops / flops * 100:.0f} % MFU)"
    else:
        share += " MFU"
    print(f"# expected ≈ {rate:,.0f} tokens/s per GPU at {share} on a {args.peak_tflops:g}-TFLOPS "
          "GPU (an estimate from FLOPs, not a measurement):")  # fmt: skip
    print(f"#   {flops / 1e9:.3f} GFLOPs per token for forward + backward"
          f"{' + the recomputed activations' if flops > model_flops else ''}; × {gpus} GPU(s) "
          f"≈ {rate * gpus:,.0f} tokens/s, {tokens / (rate * gpus):,.1f} s per step, "
          f"{tokens * train_config.max_steps / (rate * gpus) / 3600:,.1f} h for "
          f"{train_config.max_steps:,} steps (communication not counted; --peak-tflops and --mfu "
          "set the GPU and the utilisation)")  # fmt: skip
    return 0


def training_flops_per_token(config: MiniFusionConfig, seq_len: int, checkpointing=False) -> float:
    """FLOPs one training step spends per token: three forward passes' worth (the backward pass
    costs about two), plus what activation checkpointing computes again in backward — every
    layer (not the LM head) for ``True``/``"layers"``, the attention and Mamba branches for
    ``"branches"``."""
    parts = config.flops_breakdown(seq_len)
    forward = sum(parts.values())
    if not checkpointing:
        recomputed = 0.0
    elif checkpointing == "branches":
        recomputed = sum(v for k, v in parts.items() if k.startswith(("attention_", "mamba_")))
    else:
        recomputed = forward - parts["lm_head"]
    return 3 * forward + recomputed


def expected_tokens_per_second(flops_per_token: float, *, peak_tflops: float, mfu: float) -> float:
    """Tokens/s of one GPU that runs ``mfu`` of its ``peak_tflops``: an estimate, not a measurement."""
    if not (0 < peak_tflops < math.inf and 0 < mfu <= 1):  # refuses nan too
        raise ValueError(
            f"--peak-tflops must be > 0 and --mfu in (0, 1] (got {peak_tflops:g} and {mfu:g})."
        )
    return mfu * peak_tflops * 1e12 / flops_per_token


def check_block_fits(model_config: MiniFusionConfig, train_config: TrainConfig) -> None:
    """Refuse training sequences longer than the model's positions (RoPE would still run, but
    the model would learn positions its config says it does not have, and ``evaluate`` refuses
    them)."""
    if train_config.block_size > model_config.max_position_embeddings:
        raise ValueError(
            f"The training sequences ({train_config.block_size:,} tokens: data.block_size, or "
            f"train.block_size) are longer than model.max_position_embeddings "
            f"({model_config.max_position_embeddings:,}). Lower the block size, or raise "
            "model.max_position_embeddings."
        )


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    out_dir = Path(args.out)
    settings = load_settings(args.config, args.overrides)
    train_config = TrainConfig.from_dict(settings["train"])
    if train_config.device != "auto":  # an absent device is named now, not after the data
        device_named(train_config.device)
    rank = 0
    if args.deepspeed:
        from .distributed import init_distributed

        rank, world_size, _ = init_distributed()
    main_process = rank == 0
    print = builtins.print if main_process else _silent  # noqa: A001 — rank 0 speaks for all
    if main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        resolved = out_dir / "config.yaml"
        resolved.write_text(yaml.safe_dump(settings, sort_keys=False), encoding="utf-8")
        if args.fresh:
            start_fresh(out_dir)
    _barrier(args)
    model_config = MiniFusionConfig.from_yaml(out_dir / "config.yaml")  # validates every field
    check_block_fits(model_config, train_config)

    print(f"[1/4] data → {out_dir}")
    prepare = preparation_for(settings["data"], model_config.vocab_size)
    if main_process:  # one process prepares; the others then find it done and reuse it
        prepared = prepare(out_dir, progress=not args.no_progress)
    _barrier(args)
    if not main_process:
        prepared = prepare(out_dir, progress=False)
    print(prepared.summary())
    tokenizer = load_tokenizer(prepared.tokenizer_dir)
    if len(tokenizer) > model_config.vocab_size:
        raise ValueError(
            f"The tokenizer has {len(tokenizer):,} tokens but model.vocab_size is "
            f"{model_config.vocab_size:,}; set model.vocab_size ≥ {len(tokenizer):,}."
        )

    from .model import MiniFusionForCausalLM

    seed_everything(train_config.seed)
    model = MiniFusionForCausalLM(model_config)
    if isinstance(prepared, PreparedStream):
        files = (None, prepared.val_file)
        batches = StreamingBatches(prepared.training_documents(), tokenizer,
                                   train_config.block_size, train_config.batch_size)  # fmt: skip
    else:
        files, batches = (prepared.train_file, prepared.val_file), None
    if args.deepspeed:
        from .distributed import DeepSpeedTrainer, count_processes

        trainer = DeepSpeedTrainer(model, tokenizer, *files, train_config, out_dir,
                                   deepspeed_config_path=args.deepspeed, batches=batches,
                                   progress=not args.no_progress)  # fmt: skip
        print(f"      DeepSpeed ZeRO-{trainer.zero_stage} on {count_processes(world_size)}")
    else:
        trainer = Trainer(model, tokenizer, *files, train_config, out_dir, batches=batches,
                          progress=not args.no_progress)  # fmt: skip
    if trainer.device.type == "cpu":  # a CPU step re-allocates its large tensors every step:
        reuse_freed_memory()  # keep the pages instead of faulting them in again (host_memory)
    count = sum(p.numel() for p in model.parameters())
    print(
        f"[2/4] model: {count:,} parameters on {trainer.device}"
        f" ({_precision_name(trainer.compute_dtype)}); "
        f"{train_config.tokens_per_step * (world_size if args.deepspeed else 1):,} tokens per "
        f"step, {train_config.max_steps:,} steps"
    )
    if trainer.resumed_from is not None:
        print(f"      resuming from {trainer.resumed_from} (step {trainer.step:,})")
        for name, (old, new) in trainer.changed_on_resume.items():
            print(f"      train.{name}: {old} in the checkpoint → {new} from now on")
    else:
        print("      starting from scratch")
    if trainer.step >= train_config.max_steps:
        print(
            f"      this run already finished its {train_config.max_steps:,} steps: raise "
            "train.max_steps (--set train.max_steps=N) to train on, or start over with --fresh"
        )

    print("[3/4] training (Ctrl-C or SIGTERM: finish the step, save, exit)")
    result = trainer.fit(stop_at=args.stop_at)

    print(
        "[4/4] done"
        if result.stopped_by == "max_steps"
        else f"[4/4] stopped by {result.stopped_by}"
    )
    if result.final_eval is not None:
        final = result.final_eval
        print(
            f"  validation      loss {final.loss:.4f} nats/token, {final.bpc:.4f} bits/character"
            f" ({final.tokens:,} tokens, {final.characters:,} characters)"
        )
    print(f"  steps           {result.step:,} ({result.tokens:,} tokens, "
          f"{result.skipped_steps} skipped as non-finite)")  # fmt: skip
    print(f"  checkpoint      {result.checkpoint}")
    if result.export is not None:
        print(f"  model (HF)      {result.export}  — AutoModelForCausalLM.from_pretrained(...)")
    for label, name in (("metrics", "metrics.jsonl"), ("loss curve", "loss_curve.png"),
                        ("samples", "samples.txt"), ("tensorboard", "tensorboard")):  # fmt: skip
        if (out_dir / name).exists():
            print(f"  {label:<15} {out_dir / name}")
    if result.stopped_by != "max_steps":
        print("  run the same command again to continue from the checkpoint")
    if result.final_eval is not None and trainer.last_sample is not None:
        print(f"\nSample at step {result.step}:\n{trainer.last_sample}")
    print(f"\nTotal time {time.perf_counter() - started:.0f} s")
    if args.deepspeed:
        from .distributed import finish_distributed

        finish_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
