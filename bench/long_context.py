"""Long-context checks: the passkey at 64 to 8,192 tokens, and the trained model's loss by position.

* **Passkey** (:class:`minifusion.long_context.PasskeyRetrieval`): the four models of chapter 16
  (attention only, Mamba only, interleaved, parallel hybrid; equal width, depth and parameters)
  are trained at a short length with one budget, then scored on held-out sequences up to 128×
  longer — with every seed of the settings.
* **Loss by position** of the model ``make train`` exported (``runs/tiny/model`` by default) on
  its preset's held-out plays, in blocks four times as long as its training blocks. Skipped, and
  said so, when that folder does not exist.

Chapter 15 plots the saved results next to a smaller live run.

    python -m bench.long_context            # 3 seeds: about 11 minutes on one thread
    python -m bench.long_context --quick    # a smoke run of a few seconds (not saved)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import time
from pathlib import Path

import torch

from minifusion.long_context import (
    PasskeyRetrieval,
    accuracy_by_length,
    mean_by_span,
    per_position_loss,
)
from minifusion.tasks import (
    MODEL_NAMES,
    TaskBudget,
    check_equal_parameters,
    four_models,
    train_on_task,
)

from . import RESULTS_DIR
from .arguments import output_file
from .stats import mean_and_spread
from .timing import machine_description

RESULTS_FILE = RESULTS_DIR / "long_context.json"
DEFAULT_MODEL = Path("runs/tiny/model")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything one run of the benchmark uses (saved with its results)."""

    hidden_size: int
    num_layers: int
    task: PasskeyRetrieval
    budget: TaskBudget
    lengths: tuple[int, ...]  # scored lengths (the first is the training length)
    sequences: int  # held-out sequences per length
    seeds: tuple[int, ...]
    position_factor: int = 4  # loss by position: blocks this many times the training block

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FULL = Settings(
    hidden_size=32,
    num_layers=2,
    task=PasskeyRetrieval(length=64, digits=2, num_symbols=10, num_filler=1),
    budget=TaskBudget(steps=800, batch_size=32, lr=1e-2, warmup_steps=80),
    lengths=(64, 256, 1024, 2048, 4096, 8192),
    sequences=32,
    seeds=(0, 1, 2),
)

QUICK = Settings(
    hidden_size=16,
    num_layers=2,
    task=PasskeyRetrieval(length=16, digits=2, num_symbols=4, num_filler=1),
    budget=TaskBudget(steps=3, batch_size=4, lr=1e-2, warmup_steps=1),
    lengths=(16, 64),
    sequences=4,
    seeds=(0,),
)


def run_passkey(settings: Settings) -> dict:
    """``{"models": {name: parameters}, "runs": {name: [per seed: {"seed", "accuracy", "exact",
    "seconds"}]}}``, accuracy and exact as lists over ``settings.lengths``."""
    task = settings.task
    configs = four_models(
        task.vocab_size,
        hidden_size=settings.hidden_size,
        num_layers=settings.num_layers,
        max_len=max(settings.lengths),
    )
    runs: dict[str, list[dict]] = {name: [] for name in MODEL_NAMES}
    for seed in settings.seeds:
        budget = dataclasses.replace(settings.budget, seed=seed)
        for name in MODEL_NAMES:
            model, losses, seconds = train_on_task(configs[name], task, budget)
            scores = accuracy_by_length(
                model, task, list(settings.lengths), sequences=settings.sequences, seed=seed
            )
            runs[name].append(
                {
                    "seed": seed,
                    "final_loss": sum(losses[-20:]) / len(losses[-20:]),
                    "accuracy": [scores[n][0] for n in settings.lengths],
                    "exact": [scores[n][1] for n in settings.lengths],
                    "seconds": seconds,
                }
            )
            print(f"  seed {seed} {name:<11} accuracy by length "
                  + " ".join(f"{a:.2f}" for a in runs[name][-1]["accuracy"]), flush=True)  # fmt: skip
    return {"models": check_equal_parameters(configs), "runs": runs}


def run_positions(model_dir: Path, factor: int, quick: bool) -> dict | None:
    """The exported model's loss at every position of blocks ``factor`` × its training block, on
    its preset's held-out documents (``None`` where the folder is missing)."""
    from minifusion.evaluate import document_stream
    from minifusion.model_folder import load_model_folder

    if not (model_dir / "config.json").is_file():
        return None
    model, tokenizer = load_model_folder(model_dir)
    trained = _training_block(model_dir)
    block = min(trained * factor, model.config.max_position_embeddings)
    texts, description = evaluation_texts()
    ids, _ = document_stream(tokenizer, texts)
    losses = per_position_loss(model, ids, block, batch_size=4, max_blocks=2 if quick else None)
    return {
        "model": str(model_dir),
        "data": description,
        "training_block": trained,
        "block": block,
        "blocks": (len(ids) - 1) // block if not quick else 2,
        "loss": [round(v, 5) for v in losses.tolist()],
        "before_after": mean_by_span(losses, [0, trained, block]),
    }


def evaluation_texts() -> tuple[list[str], str]:
    """The ``tiny`` preset's held-out plays (what ``make train`` validated on)."""
    from minifusion.evaluate import evaluation_documents

    return evaluation_documents("tiny")


def _training_block(model_dir: Path) -> int:
    """The block size the run trained with (the ``config.yaml`` the run saved next to its model
    folder: ``train.block_size`` where set, else ``data.block_size``), else the preset's 256."""
    saved = model_dir.parent / "config.yaml"
    if saved.is_file():
        import yaml

        settings = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
        for section in ("train", "data"):
            value = (settings.get(section) or {}).get("block_size")
            if value:
                return int(value)
    return 256


def run(quick: bool = False, model_dir: Path = DEFAULT_MODEL) -> dict:
    """Both checks (``quick``: tiny sizes, seconds), as JSON-serialisable results. One thread:
    these models are far too small to gain from two."""
    settings = QUICK if quick else FULL
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started = time.perf_counter()
    try:
        results = {
            "benchmark": "long_context",
            "quick": quick,
            "machine": machine_description(torch.device("cpu")),
            "date": datetime.date.today().isoformat(),
            "settings": settings.to_dict(),
            "passkey": run_passkey(settings),
            "positions": run_positions(model_dir, settings.position_factor, quick),
        }
    finally:
        torch.set_num_threads(threads)
    results["seconds"] = time.perf_counter() - started
    return results


def markdown(results: dict) -> str:
    """The passkey table (mean ± spread over seeds) and the loss before/after the training
    length."""
    settings = results["settings"]
    lengths = settings["lengths"]
    lines = [
        f"Passkey ({settings['task']['digits']} symbols), trained at {lengths[0]} tokens, "
        f"accuracy by length; {len(settings['seeds'])} seed(s), mean ± spread",
        "",
        "| model | " + " | ".join(f"{n:,}" for n in lengths) + " |",
        "|---" * (len(lengths) + 1) + "|",
    ]
    for name, runs in results["passkey"]["runs"].items():
        cells = []
        for i in range(len(lengths)):
            mean, spread = mean_and_spread([r["accuracy"][i] for r in runs])
            cells.append(f"{mean:.2f} ± {spread:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    positions = results["positions"]
    lines.append("")
    if positions is None:
        lines.append("Loss by position: no exported model (run `make train` first).")
    else:
        before, after = positions["before_after"]
        lines.append(
            f"Loss by position of {positions['model']} ({positions['blocks']} blocks of "
            f"{positions['block']:,} tokens): {before:.4f} nats/token within the training length "
            f"({positions['training_block']}), {after:.4f} after it."
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.long_context", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes; seconds; not saved")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                        help=f"exported model for the loss by position ({DEFAULT_MODEL})")  # fmt: skip
    parser.add_argument("--out", type=output_file, default=RESULTS_FILE,
                        help="where the full run's JSON is saved")  # fmt: skip
    args = parser.parse_args(argv)
    if args.model != DEFAULT_MODEL and not (args.model / "config.json").is_file():
        parser.error(f"--model {args.model} is not an exported model (a folder with config.json, "
                     f"such as a run's model/); leave --model out to use {DEFAULT_MODEL}, which "
                     "`make train` writes.")  # fmt: skip
    results = run(quick=args.quick, model_dir=args.model)
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
