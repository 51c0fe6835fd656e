"""Chapter 17 — the fine-tuning script: instruction tuning, fully or with LoRA, resumable.
::

    python -m minifusion.finetune --base runs/tiny/model --out runs/tiny-sft
    python -m minifusion.finetune --base runs/tiny/model --out runs/tiny-lora --lora
    python -m minifusion.finetune --base runs/tiny/model --out runs/tiny-lora --lora \\
        --lora-targets q_proj,v_proj --lora-rank 4

The base model answers the questions of :mod:`minifusion.instruct`, built from the plays it
was pretrained on; the test questions come from the plays it was *not* trained on (the same
split as pretraining). Training is the pretraining loop (``minifusion.training.Trainer``) with
instruction batches whose prompt tokens are labelled ``-100``: the same checkpoints, the same
resume (rerun the command), the same stop on Ctrl-C/SIGTERM. At the end ``<out>`` holds

* ``model/`` — the fine-tuned model (LoRA merged into it), Hub-ready, tokenizer with its chat
  template;
* ``adapter/`` — with ``--lora``, the adapter alone (a few KB), for ``PeftModel.from_pretrained``;
* ``eval.json`` — exact match on the held-out plays before and after, per task.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .checkpoint import (
    CheckpointError,
    export_pretrained,
    file_in_the_way,
    remove_run_outputs,
)
from .instruct import (
    TASKS,
    Example,
    InstructionBatches,
    InstructionValidation,
    build_examples,
    exact_match,
    first_of_each_task,
    split_by_play,
    with_chat_template,
)
from .training import TrainConfig, Trainer, TrainingDivergedError

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "DEFAULT_TASKS",
    "FineTuner",
    "InstructionData",
    "add_lora",
    "main",
]

# Every projection that reads or writes the residual stream in attention and Mamba layers.
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "out_proj")
# One task the base models of this course learn in minutes (is_question: 0.50 → about 0.75-0.9
# exact match on held-out plays) and one they do not (who_said needs copying a name from the
# context, which a model this small has not learnt: it stays near chance; chapter 17).
DEFAULT_TASKS = ("is_question", "who_said")
LORA_RANK, LORA_ALPHA = 16, 32.0  # the command's adapter defaults (chapter 17 uses them too)
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "tensorboard", "loss_curve.png", "samples.txt",
               "model", "adapter", "eval.json", "gate_heatmaps.png")  # fmt: skip


@dataclass
class InstructionData:
    train: list[Example]
    test: list[Example]

    @classmethod
    def from_corpus(
        cls,
        source: str = "shakespeare",
        *,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        seed: int = 0,
        test_per_task: int = 200,
        tasks: Sequence[str] = DEFAULT_TASKS,
    ) -> InstructionData:
        """Training examples from the pretraining split's training plays, test examples
        (``test_per_task`` of each task) from its held-out plays."""
        from .data import _datasets_progress, load_documents

        unknown = sorted(set(tasks) - set(TASKS))
        if unknown:
            raise ValueError(f"Unknown task(s) {unknown}; choose from {list(TASKS)}.")
        with _datasets_progress(False):  # no "Generating train split" bar
            documents = load_documents(source)
        train_docs, test_docs = split_by_play(documents, val_fraction, split_seed)
        train = [e for e in build_examples(train_docs, seed=seed) if e.task in tasks]
        counts = {task: sum(e.task == task for e in train) for task in tasks}
        if empty := [task for task, count in counts.items() if count == 0]:
            raise ValueError(
                f"The corpus {source!r} gave no training example of {empty}: the tasks need plays "
                "(a speaker line such as 'Romeo.' above each speech). Choose other --tasks."
            )
        fewest = min(counts.values())
        train = first_of_each_task(train, fewest)  # as many of each: none drowns the others
        test = build_examples(test_docs, seed=seed + 1, max_per_task=test_per_task)
        test = [e for e in test if e.task in tasks]
        if not train or not test:
            raise ValueError(
                f"The corpus {source!r} gave {len(train)} training and {len(test)} test examples: "
                "the instruction tasks need plays (speaker lines such as 'Romeo.' above speech)."
            )
        return cls(train, test)


def add_lora(
    model: nn.Module,
    *,
    rank: int = 16,
    alpha: float = 32.0,
    targets: Sequence[str] = DEFAULT_LORA_TARGETS,
    train_norms: bool = True,
):
    """``model`` wrapped by peft with LoRA adapters on the linear layers named ``targets``:
    only the adapters train (``W x + (alpha / rank) · B A x``, ``B`` starting at zero, so the
    wrapped model starts equal to the base).

    ``train_norms`` also trains the RMSNorm gains (a few hundred numbers, saved with the
    adapter). With them frozen, the final norm's gain and the tied embedding fix how large the
    logits can get, and a low-rank change of the layers cannot make the model confident: on
    eight random next tokens, 150 steps bring a frozen-norm LoRA to 3.2 nats and one with its
    norms trained to 0.7 (full fine-tuning: 0.01).
    """
    from peft import LoraConfig, get_peft_model

    present = {
        name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)
    }
    missing = sorted(set(targets) - present)
    if missing:
        raise ValueError(
            f"LoRA targets {missing} are not linear layers of this model; it has {sorted(present)}."
        )
    # every module whose name ends in "norm" (input_layernorm, norm, …), named one by one: with
    # "norm" alone, peft 0.21 wrapped all of them but 0.22 only the final `norm`
    norms = sorted({name.rsplit(".", 1)[-1] for name, _ in model.named_modules()
                    if name.endswith("norm")})  # fmt: skip
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                        bias="none", task_type="CAUSAL_LM",
                        modules_to_save=norms if train_norms and norms else None)  # fmt: skip
    with warnings.catch_warnings():  # peft asks transformers a question it renamed
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing", category=FutureWarning
        )
        return get_peft_model(model, config)


class FineTuner(Trainer):
    """The pretraining :class:`~minifusion.training.Trainer` on instruction data; its export
    merges LoRA adapters into the model (and saves the adapter on its own too)."""

    def export(self, directory: str | Path, final_eval=None) -> Path:
        directory = Path(directory)
        facts = self.card_facts(final_eval)
        facts["fine-tuning"] = "LoRA (merged)" if _is_peft(self.model) else "full"
        if _is_peft(self.model):
            self.model.save_pretrained(directory.parent / "adapter")
            merged = copy.deepcopy(self.model).merge_and_unload()
        else:
            merged = self.model
        return export_pretrained(merged, self.tokenizer, directory, training=facts).path


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (shared weights once; with LoRA, the total is
    the model's own weights plus the adapters: peft's frozen originals of the modules it
    trains a copy of are not counted twice)."""
    seen, trainable, total = set(), 0, 0
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        if parameter.requires_grad:
            trainable += parameter.numel()
        if "original_module" not in name:
            total += parameter.numel()
    return trainable, total


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m minifusion.finetune",
        description="Instruction-tune a saved MiniFusion model (fully or with LoRA) on "
        "questions about the plays; rerun the same command to resume.",
    )
    parser.add_argument("--base", required=True, help="a saved model folder, e.g. runs/tiny/model")
    parser.add_argument("--out", required=True, help="run folder (checkpoints, logs, model/)")
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters, not every weight")
    # The adapter flags default to None, so that giving one without --lora can be refused.
    parser.add_argument("--lora-rank", type=int, help=f"adapter rank r (default: {LORA_RANK})")
    parser.add_argument("--lora-alpha", type=float,
                        help="adapter updates are scaled by alpha / rank (default: "
                        f"{LORA_ALPHA:g})")  # fmt: skip
    parser.add_argument("--lora-targets",
                        help="comma-separated linear layer names (default: "
                        f"{','.join(DEFAULT_LORA_TARGETS)})")  # fmt: skip
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                        help=f"comma-separated, from {', '.join(TASKS)} (default: %(default)s)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps (default: 400)")
    parser.add_argument("--lr", type=float, help="peak lr (default: 1e-3 full, 5e-3 LoRA)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="examples per step (default: %(default)s)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0,
                        help="the questions drawn, the adapters' initial values and the batch order "
                        "(default: %(default)s)")  # fmt: skip
    parser.add_argument("--corpus", default="shakespeare",
                        help="plays to build the tasks from: 'shakespeare' or a path/glob of "
                        ".txt or .jsonl files (default: %(default)s)")  # fmt: skip
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="plays held out, as in pretraining (default: %(default)s)")  # fmt: skip
    parser.add_argument("--split-seed", type=int, default=0, help="as in pretraining (default: %(default)s)")
    parser.add_argument("--test-per-task", type=int, default=200,
                        help="held-out questions scored per task (default: %(default)s)")  # fmt: skip
    parser.add_argument("--fresh", action="store_true", help="delete this run's outputs first")
    parser.add_argument("--stop-at", type=int, metavar="STEP",
                        help="pause after this step: save a checkpoint and exit (rerun to go on)")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    problem = _argument_problem(args)
    if problem is not None:
        parser.error(problem)
    if args.no_progress:
        from .utils import silence_library_progress_bars

        silence_library_progress_bars()
    try:
        return run(args)
    except (CheckpointError, TrainingDivergedError, ValueError, FileNotFoundError,
            IsADirectoryError) as error:  # fmt: skip
        print(f"error: {error}", file=sys.stderr)
        return 1


def _argument_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the flags, checked before a model is loaded (``None``: nothing); fills
    in the adapter defaults."""
    if problem := file_in_the_way(args.out, "a fine-tuning run is a folder"):
        return problem
    adapter_flags = (args.lora_rank, args.lora_alpha, args.lora_targets)
    if not args.lora and any(flag is not None for flag in adapter_flags):
        return ("--lora-rank, --lora-alpha and --lora-targets shape LoRA adapters: add --lora to "
                "train adapters, or leave them out to train every weight.")  # fmt: skip
    args.lora_rank = LORA_RANK if args.lora_rank is None else args.lora_rank
    args.lora_alpha = LORA_ALPHA if args.lora_alpha is None else args.lora_alpha
    args.lora_targets = args.lora_targets or ",".join(DEFAULT_LORA_TARGETS)
    checks = (
        (args.lora_rank >= 1, f"--lora-rank must be ≥ 1 (e.g. {LORA_RANK}), not "
                              f"{args.lora_rank}"),  # fmt: skip
        (0 < args.lora_alpha < math.inf, f"--lora-alpha must be > 0 (e.g. {LORA_ALPHA:g}), not "
                                         f"{args.lora_alpha}"),  # fmt: skip
        (bool(_names(args.lora_targets)), "--lora-targets names no layer (e.g. q_proj,v_proj)"),
        (bool(_names(args.tasks)), f"--tasks names no task: one or more of {', '.join(TASKS)}"),
        (args.steps >= 1, f"--steps must be ≥ 1, not {args.steps}"),
        (args.batch_size >= 1, f"--batch-size must be ≥ 1, not {args.batch_size}"),
        (args.test_per_task >= 1, f"--test-per-task must be ≥ 1, not {args.test_per_task}"),
        (0 < args.val_fraction < 1, f"--val-fraction must be between 0 and 1, not "
                                    f"{args.val_fraction}: the held-out plays are where the "
                                    "fine-tuned model is tested (0.1: one play in ten)"),  # fmt: skip
        (args.stop_at is None or args.stop_at >= 1, f"--stop-at must be ≥ 1, not {args.stop_at}"),
    )
    return next((f"{message}." for holds, message in checks if not holds), None)


def _names(comma_separated: str) -> list[str]:
    return [name.strip() for name in comma_separated.split(",") if name.strip()]


def _check_resumes_the_same_run(eval_path: Path, facts: dict[str, Any]) -> None:
    """Refuse to go on with a run folder fine-tuned on other tasks, or with(out) LoRA: its
    checkpoints, data and base measurement belong to that run."""
    if not eval_path.is_file():
        return
    saved = json.loads(eval_path.read_text(encoding="utf-8"))
    for key, flag in (("tasks", "--tasks"), ("lora", "--lora")):
        if key in saved and saved[key] != facts[key]:
            raise ValueError(
                f"{eval_path.parent} was fine-tuned with {key} = {saved[key]}, this command asks "
                f"for {facts[key]} ({flag}). Rerun with the run's own settings to resume it, or "
                "start over with --fresh (or choose another --out)."
            )


def run(args: argparse.Namespace) -> int:
    from .model_folder import load_model_folder
    from .utils import seed_everything

    out_dir = Path(args.out)
    tasks = _names(args.tasks)
    facts = {"tasks": tasks, "lora": bool(args.lora)}  # what a resumed run must share
    eval_path = out_dir / "eval.json"
    if not args.fresh:
        _check_resumes_the_same_run(eval_path, facts)
    model, tokenizer = load_model_folder(args.base)
    if getattr(model.config, "model_type", None) != "minifusion":
        raise ValueError(
            f"{args.base} holds a {model.config.model_type!r} model; minifusion.finetune trains "
            "MiniFusion models (its loop adds their auxiliary losses)."
        )
    tokenizer = with_chat_template(tokenizer)
    data = InstructionData.from_corpus(args.corpus, val_fraction=args.val_fraction,
                                       split_seed=args.split_seed, seed=args.seed,
                                       test_per_task=args.test_per_task, tasks=tasks)  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.fresh:
        remove_run_outputs(out_dir, RUN_OUTPUTS)
    before = None
    if eval_path.is_file():  # a resumed run measured its base already
        before = json.loads(eval_path.read_text(encoding="utf-8")).get("base")
    if before is None:
        before = exact_match(model, tokenizer, data.test)
        eval_path.write_text(json.dumps({**facts, "base": before}, indent=2) + "\n",
                             encoding="utf-8")  # fmt: skip

    seed_everything(args.seed)
    if args.lora:
        model = add_lora(model, rank=args.lora_rank, alpha=args.lora_alpha,
                         targets=_names(args.lora_targets))  # fmt: skip
    lr = args.lr if args.lr is not None else (5e-3 if args.lora else 1e-3)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": data.test[0].prompt}],
                                           add_generation_prompt=True, tokenize=False)  # fmt: skip
    config = TrainConfig(
        batch_size=args.batch_size, block_size=512, max_steps=args.steps, lr=lr,
        warmup_steps=min(20, max(args.steps // 10, 1)), eval_every=max(args.steps // 4, 1),
        save_every=max(args.steps // 4, 1), eval_batches=4, seed=args.seed,
        sample_prompt=prompt, sample_tokens=8, sample_temperature=0.5,
    )  # fmt: skip
    batches = InstructionBatches(tokenizer, data.train, args.batch_size, seed=args.seed)
    trainer = FineTuner(model, tokenizer, None, None, config, out_dir, batches=batches,
                        validation=InstructionValidation(tokenizer, data.test),
                        progress=not args.no_progress)  # fmt: skip
    trainable, total = trainable_parameters(trainer.model)
    kind = f"LoRA rank {args.lora_rank} on {args.lora_targets}" if args.lora else "every weight"
    print(f"[1/3] {len(data.train):,} training examples, {len(data.test):,} held-out "
          f"({', '.join(tasks)}); training {kind}: {trainable:,} of {total:,} parameters")  # fmt: skip
    if trainer.resumed_from is not None:
        print(f"      resuming from {trainer.resumed_from} (step {trainer.step:,})")
    print("[2/3] fine-tuning (Ctrl-C or SIGTERM: finish the step, save, exit)")
    result = trainer.fit(stop_at=args.stop_at)
    if result.stopped_by != "max_steps":
        print(f"[3/3] stopped by {result.stopped_by} at step {trainer.step}; rerun to go on")
        return 0
    after = exact_match(trainer.model, tokenizer, data.test)
    eval_path.write_text(json.dumps({**facts, "base": before, "finetuned": after}, indent=2)
                         + "\n", encoding="utf-8")  # fmt: skip
    print(f"[3/3] exact match on the held-out plays ({len(data.test)} questions):")
    print(f"      {'task':<14} {'base':>6} {'tuned':>6}")
    for task in [*tasks, "all"]:
        print(f"      {task:<14} {before.get(task, float('nan')):>6.3f} {after[task]:>6.3f}")
    print(f"      model → {result.export}")
    if args.lora:
        print(f"      adapter → {out_dir / 'adapter'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
