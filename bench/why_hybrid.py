"""Why hybrid? Four models of equal size on recall, selective copying and language modelling.

Attention only, Mamba only, interleaved (Jamba-style) and parallel hybrid (MiniFusion's layer),
built by :func:`minifusion.tasks.four_models` with the same width, depth and parameter count:

* **associative recall** (MQAR) and **selective copying**: every model trained with the same
  steps, batch, learning-rate schedule and batches; accuracy at the answer positions of held-out
  batches, and the share of sequences with every answer right;
* **language modelling** on the Shakespeare corpus at equal *wall-clock* time: validation bits
  per character after the same number of training seconds, with the curve of bpc vs seconds.

Chapter 16 (``notebooks/16_why_hybrid.ipynb``) shows the saved results next to a smaller live run.

    python -m bench.why_hybrid            # the full run: a few minutes on one CPU thread
    python -m bench.why_hybrid --quick    # a smoke run of a few seconds (not saved)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import tempfile
import time
from pathlib import Path

import torch

from minifusion.data import prepare_data
from minifusion.tasks import (
    MODEL_NAMES,
    AssociativeRecall,
    LMBudget,
    SelectiveCopying,
    TaskBudget,
    check_equal_parameters,
    compare_lm,
    compare_on_task,
    four_models,
)
from minifusion.tokenizer import load_tokenizer
from minifusion.training import ValidationSet

from .timing import machine_description

RESULTS_FILE = Path(__file__).resolve().parent / "results" / "why_hybrid.json"
LOSS_WINDOW = 10  # training losses are saved as means over windows of this many steps


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything one run of the benchmark uses (saved with its results)."""

    hidden_size: int
    num_layers: int
    recall: AssociativeRecall
    copying: SelectiveCopying
    task_budget: TaskBudget
    lm_vocab_size: int
    lm_budget: LMBudget

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)  # the task and budget dataclasses become dicts too


FULL = Settings(
    hidden_size=32,
    num_layers=2,
    recall=AssociativeRecall(num_pairs=4, num_queries=4, num_keys=16, num_values=16),
    copying=SelectiveCopying(num_tokens=4, region=16, num_symbols=8),
    task_budget=TaskBudget(steps=700, batch_size=32, lr=1e-2, warmup_steps=70, eval_batches=16),
    lm_vocab_size=512,
    lm_budget=LMBudget(
        seconds=10.0, batch_size=16, block_size=64, lr=1e-2, evals=5, eval_blocks=32
    ),
)

QUICK = Settings(
    hidden_size=16,
    num_layers=2,
    recall=AssociativeRecall(num_pairs=2, num_queries=2, num_keys=4, num_values=4),
    copying=SelectiveCopying(num_tokens=2, region=4, num_symbols=4),
    task_budget=TaskBudget(steps=3, batch_size=4, lr=1e-2, warmup_steps=1, eval_batches=1),
    lm_vocab_size=300,
    lm_budget=LMBudget(seconds=0.2, batch_size=2, block_size=16, evals=1, eval_blocks=2),
)


def _windowed(values: list[float], window: int = LOSS_WINDOW) -> list[float]:
    return [
        sum(values[i : i + window]) / len(values[i : i + window])
        for i in range(0, len(values), window)
    ]


def _model_table(configs) -> dict:
    counts = check_equal_parameters(configs)
    return {
        name: {
            "parameters": counts[name],
            "mixer_types": config.mixer_types,
            "intermediate_size": config.intermediate_size,
        }
        for name, config in configs.items()
    }


def _models(vocab_size: int, settings: Settings, max_len: int) -> dict:
    return four_models(
        vocab_size,
        hidden_size=settings.hidden_size,
        num_layers=settings.num_layers,
        max_len=max_len,
    )


def _run_task(task, settings: Settings) -> dict:
    configs = _models(task.vocab_size, settings, max_len=task.seq_len)
    runs = compare_on_task(configs, task, settings.task_budget)
    out = {"task": task.name, "seq_len": task.seq_len, "models": _model_table(configs), "runs": {}}
    for name, run in runs.items():
        record = run.to_dict()
        record["losses"] = _windowed(record["losses"])
        out["runs"][name] = record
    return out


def _lm_corpus(settings: Settings, folder: Path, quick: bool):
    """The Shakespeare token files (a tiny local text for the quick run)."""
    if quick:
        corpus = folder / "corpus"
        corpus.mkdir()
        for i in range(3):
            (corpus / f"part{i}.txt").write_text(
                "Now is the winter of our discontent, made glorious summer.\n" * (20 + i)
            )
        source, fraction = str(corpus / "*.txt"), 1 / 3
    else:
        source, fraction = "shakespeare", 0.1
    return prepare_data(
        folder / "data",
        source=source,
        vocab_size=settings.lm_vocab_size,
        val_fraction=fraction,
        progress=False,
    )


def _run_lm(settings: Settings, quick: bool) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        data = _lm_corpus(settings, Path(folder), quick)
        tokenizer = load_tokenizer(data.tokenizer_dir)
        budget = settings.lm_budget
        validation = ValidationSet(data.val_file, budget.block_size, tokenizer)
        configs = _models(len(tokenizer), settings, max_len=budget.block_size)
        runs = compare_lm(configs, data.train_file, validation, budget)
    return {
        "corpus": "tiny local text" if quick else "shakespeare",
        "vocab_size": len(tokenizer),
        "models": _model_table(configs),
        "runs": {name: run.to_dict() for name, run in runs.items()},
    }


def run(quick: bool = False) -> dict:
    """Run the benchmark (``quick``: tiny sizes, seconds) and return JSON-serialisable results.

    The models are tiny, so each step is a few dozen small kernels: one thread runs them about as
    fast as two, and a second thread competing with other work on the machine slows every step
    down many times. The run therefore uses one thread (and restores the setting after).
    """
    settings = QUICK if quick else FULL
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started = time.perf_counter()
    try:
        results = {
            "benchmark": "why_hybrid",
            "quick": quick,
            "machine": machine_description(torch.device("cpu")),
            "threads": torch.get_num_threads(),
            "date": datetime.date.today().isoformat(),
            "settings": settings.to_dict(),
            "tasks": {
                "recall": _run_task(settings.recall, settings),
                "copying": _run_task(settings.copying, settings),
            },
            "lm": _run_lm(settings, quick),
        }
    finally:
        torch.set_num_threads(threads)
    results["seconds"] = time.perf_counter() - started
    return results


# ----------------------------------------------------------------------------------------------
# The RESULTS.md section
# ----------------------------------------------------------------------------------------------
def _best(scores: dict[str, float], higher: bool = True) -> str:
    """The best model(s) and the score, e.g. ``"hybrid (0.947)"`` or ``"mamba, hybrid (1.000)"``."""
    top = (max if higher else min)(scores.values())
    return f"{', '.join(n for n, s in scores.items() if s == top)} ({top:.3f})"


def _row(label: str, cells: list[str]) -> str:
    return "| " + " | ".join([label, *cells]) + " |"


def markdown(results: dict) -> str:
    """A RESULTS.md section: parameter counts, task accuracy, bits per character at equal time."""
    settings = results["settings"]
    budget, lm_budget = settings["task_budget"], settings["lm_budget"]
    tasks, lm = results["tasks"], results["lm"]
    names = [n for n in MODEL_NAMES if n in lm["runs"]]
    threads = f"{results['threads']} thread" + ("s" if results["threads"] != 1 else "")
    lines = [
        "## Why hybrid? Equal-size models on recall, copying and language modelling",
        "",
        f"Four models of equal width ({settings['hidden_size']}), depth "
        f"({settings['num_layers']} layers) and parameter count, differing only in their mixers "
        "(`minifusion.tasks.four_models`; the feed-forward width absorbs the difference). "
        f"Machine: {results['machine']}, {threads}; "
        f"run time {results['seconds']:.1f} s. Written by `python -m bench.why_hybrid`.",
        "",
        _row("", names),
        "|---|" + "---|" * len(names),
    ]
    sections = [(tasks[k]["task"], tasks[k]["models"]) for k in ("recall", "copying")]
    for label, models in [*sections, ("language model", lm["models"])]:
        lines.append(_row(f"parameters ({label})", [f"{models[n]['parameters']:,}" for n in names]))
    for key in ("recall", "copying"):
        runs, task = tasks[key]["runs"], tasks[key]["task"]
        lines += [
            _row(f"{task}: accuracy", [f"{runs[n]['accuracy']:.3f}" for n in names]),
            _row(f"{task}: all answers right", [f"{runs[n]['exact']:.3f}" for n in names]),
            _row(f"{task}: training s", [f"{runs[n]['seconds']:.1f}" for n in names]),
        ]
    lm_runs = lm["runs"]
    bpc_label = f"language model: val bpc after {lm_budget['seconds']:g} s"
    lines += [
        _row(bpc_label, [f"{lm_runs[n]['final_bpc']:.3f}" for n in names]),
        _row("language model: steps in that time", [f"{lm_runs[n]['steps']:,}" for n in names]),
    ]
    recall = {n: tasks["recall"]["runs"][n]["accuracy"] for n in names}
    copying = {n: tasks["copying"]["runs"][n]["accuracy"] for n in names}
    bpc = {n: lm_runs[n]["final_bpc"] for n in names}
    lines += [
        "",
        f"Tasks: {budget['steps']} steps of {budget['batch_size']} sequences each, peak lr "
        f"{budget['lr']:g}, the same batches for every model; accuracy over "
        f"{budget['eval_batches'] * budget['batch_size']} held-out sequences. Language model: "
        f"{lm_budget['seconds']:g} s of training each (evaluations excluded), batches of "
        f"{lm_budget['batch_size']} × {lm_budget['block_size']} tokens. "
        f"Highest recall accuracy: {_best(recall)}; highest copying accuracy: {_best(copying)}; "
        f"lowest bpc at equal time: {_best(bpc, higher=False)}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes; seconds; not saved")
    parser.add_argument(
        "--out", type=Path, default=RESULTS_FILE, help="where the full run's JSON is saved"
    )
    args = parser.parse_args(argv)
    results = run(quick=args.quick)
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
