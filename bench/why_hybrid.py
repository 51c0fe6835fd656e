"""Why hybrid? Four models of equal size on recall, selective copying and language modelling.

Attention only, Mamba only, interleaved (Jamba-style) and parallel hybrid (MiniFusion's layer),
built by :func:`minifusion.tasks.four_models` with the same width, depth and parameter count:

* **associative recall** (MQAR) and **selective copying**: every model trained with the same
  steps, batch, learning-rate schedule and batches; accuracy at the answer positions of held-out
  batches, and the share of sequences with every answer right;
* **language modelling** on the Shakespeare corpus at equal *wall-clock* time: validation bits
  per character after the same number of training seconds, with the curve of bpc vs seconds.

Chapter 16 (``notebooks/16b_equal_budget.ipynb`` and ``notebooks/16c_equal_time_and_cost.ipynb``)
shows the saved results next to a smaller live run.

    python -m bench.why_hybrid            # the full run, 3 seeds: about 11 minutes on one thread
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
    default_mamba_shape,
    four_models,
)
from minifusion.tokenizer import load_tokenizer
from minifusion.training import ValidationSet

from . import RESULTS_DIR
from .arguments import output_file
from .stats import mean_and_spread, wins_in_every_seed
from .timing import machine_description

RESULTS_FILE = RESULTS_DIR / "why_hybrid.json"
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
    seeds: tuple[int, ...] = (0,)  # every experiment is repeated with each seed (weights, data)

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
    seeds=(0, 1, 2),
)

QUICK = Settings(
    hidden_size=16,
    num_layers=2,
    recall=AssociativeRecall(num_pairs=2, num_queries=2, num_keys=4, num_values=4),
    copying=SelectiveCopying(num_tokens=2, region=4, num_symbols=4),
    task_budget=TaskBudget(steps=3, batch_size=4, lr=1e-2, warmup_steps=1, eval_batches=1),
    lm_vocab_size=300,
    lm_budget=LMBudget(seconds=0.2, batch_size=2, block_size=16, evals=1, eval_blocks=2),
    seeds=(0, 1),
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


def _run_task(task, settings: Settings, seed: int) -> dict:
    configs = _models(task.vocab_size, settings, max_len=task.seq_len)
    runs = compare_on_task(configs, task, dataclasses.replace(settings.task_budget, seed=seed))
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


def _run_lm(settings: Settings, quick: bool) -> list[dict]:
    """The language-model race once per seed (one corpus and tokenizer for all of them)."""
    with tempfile.TemporaryDirectory() as folder:
        data = _lm_corpus(settings, Path(folder), quick)
        tokenizer = load_tokenizer(data.tokenizer_dir)
        block_size = settings.lm_budget.block_size
        validation = ValidationSet(data.val_file, block_size, tokenizer)
        configs = _models(len(tokenizer), settings, max_len=block_size)
        results = []
        for seed in settings.seeds:
            budget = dataclasses.replace(settings.lm_budget, seed=seed)
            runs = compare_lm(configs, data.train_file, validation, budget)
            results.append(
                {
                    "corpus": "tiny local text" if quick else "shakespeare",
                    "vocab_size": len(tokenizer),
                    "models": _model_table(configs),
                    "runs": {name: run.to_dict() for name, run in runs.items()},
                }
            )
    return results


def run(quick: bool = False) -> dict:
    """Run the benchmark (``quick``: tiny sizes, seconds) and return JSON-serialisable results.

    Every experiment runs once per seed of the settings. ``tasks`` and ``lm`` hold the first
    seed's runs in full (with their curves); ``more_seeds`` the others' (``{"seed", "tasks",
    "lm"}`` each); :func:`scores_by_seed` gathers the final scores of all of them.

    The models are tiny, so each step is a few dozen small kernels: one thread runs them about as
    fast as two, and a second thread competing with other work on the machine slows every step
    down many times. The run therefore uses one thread (and restores the setting after).
    """
    settings = QUICK if quick else FULL
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started = time.perf_counter()
    try:
        tasks = [
            {
                "recall": _run_task(settings.recall, settings, seed),
                "copying": _run_task(settings.copying, settings, seed),
            }
            for seed in settings.seeds
        ]
        lm = _run_lm(settings, quick)
        results = {
            "benchmark": "why_hybrid",
            "quick": quick,
            "machine": machine_description(torch.device("cpu")),
            "threads": torch.get_num_threads(),
            "date": datetime.date.today().isoformat(),
            "settings": settings.to_dict(),
            "mamba_shape": default_mamba_shape(),  # what four_models gave every Mamba mixer
            "tasks": tasks[0],
            "lm": lm[0],
            "more_seeds": [
                {"seed": seed, "tasks": t, "lm": m}
                for seed, t, m in zip(settings.seeds[1:], tasks[1:], lm[1:])
            ],
        }
    finally:
        torch.set_num_threads(threads)
    results["seconds"] = time.perf_counter() - started
    return results


# ----------------------------------------------------------------------------------------------
# Scores over seeds, and the verdict they support
# ----------------------------------------------------------------------------------------------
#: (key, label, higher is better) of the final scores compared across seeds.
METRICS = (
    ("recall", "associative recall: accuracy", True),
    ("copying", "selective copying: accuracy", True),
    ("lm", "language model: val bpc", False),
)


def scores_by_seed(results: dict) -> dict[str, dict[str, list[float]]]:
    """``{metric key: {model: [final score of each seed]}}`` (accuracy, or bpc for ``"lm"``).

    Results saved before seeds existed hold one seed: every list then has one value.
    """
    records = [(results["tasks"], results["lm"])]
    records += [(more["tasks"], more["lm"]) for more in results.get("more_seeds", [])]
    scores: dict[str, dict[str, list[float]]] = {key: {} for key, _, _ in METRICS}
    for tasks, lm in records:
        for key in ("recall", "copying"):
            for name, run in tasks[key]["runs"].items():
                scores[key].setdefault(name, []).append(run["accuracy"])
        for name, run in lm["runs"].items():
            scores["lm"].setdefault(name, []).append(run["final_bpc"])
    return scores


def verdict(results: dict) -> list[str]:
    """One sentence per metric: the best model on average, and which others it beats in *every*
    seed (a gap smaller than the seed-to-seed spread does not count as a win)."""
    sentences = []
    by_seed = scores_by_seed(results)
    for key, label, higher in METRICS:
        scores = by_seed[key]
        means = {name: mean_and_spread(values)[0] for name, values in scores.items()}
        best = (max if higher else min)(means, key=means.get)
        mean, spread = mean_and_spread(scores[best])
        seeds = len(scores[best])
        always, not_always = [], []
        for other, values in scores.items():
            if other == best:
                continue
            wins, always_ahead = wins_in_every_seed(scores[best], values, higher)
            if always_ahead:
                always.append(other)
            else:
                not_always.append(f"{other} (ahead in {wins} of {seeds})")
        sentence = (
            f"{label} — {best} best on average ({mean:.3f} ± {spread:.3f}, {seeds} "
            f"seed{'s' if seeds != 1 else ''}); ahead in every seed of: "
            f"{', '.join(always) if always else 'none'}"
        )
        if not_always:
            sentence += f"; not in every seed of: {', '.join(not_always)}"
        sentences.append(sentence + ".")
    return sentences


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
    by_seed = scores_by_seed(results)
    seeds = len(by_seed["lm"][names[0]])
    if seeds > 1:  # the rows above are the first seed's; these summarise all of them
        for key, label, _ in METRICS:
            cells = ["{:.3f} ± {:.3f}".format(*mean_and_spread(by_seed[key][n])) for n in names]
            lines.append(_row(f"{label}, mean ± sd of {seeds} seeds", cells))
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
        f"lowest bpc at equal time: {_best(bpc, higher=False)}"
        + (" (first seed)." if seeds > 1 else "."),
        "",
    ]
    if seeds > 1:
        lines += [f"- {sentence}" for sentence in verdict(results)] + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.why_hybrid", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes; seconds; not saved")
    parser.add_argument(
        "--out", type=output_file, default=RESULTS_FILE, help="where the full run's JSON is saved"
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
