"""DeepSpeed runs on the CPU (gloo): train, save, resume exactly, change world size, SIGTERM."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")
pytestmark = [pytest.mark.distributed, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
PRESET = """
model:
  vocab_size: 300
  hidden_size: 32
  num_hidden_layers: 2
  num_attention_heads: 4
  num_key_value_heads: 2
  mixer_types: [hybrid, hybrid]
  ffn_types: [dense, moe]
  moe_num_experts: 4
  moe_top_k: 2
  moe_aux_loss_free_bias: true
  moe_bias_update_rate: 0.01
  mamba_d_state: 8
  fusion_gate_rank: 8
  sliding_window: 8
  max_position_embeddings: 64
data:
  source: '{corpus}/*.txt'
  val_fraction: 0.2
  block_size: 16
train:
  batch_size: 2
  max_steps: 6
  warmup_steps: 2
  eval_every: 3
  save_every: 3
  log_every: 1
  eval_batches: 2
  sample_tokens: 4
  tensorboard: false
"""


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    from tests.conftest import write_training_corpus

    root = tmp_path_factory.mktemp("dist")
    corpus = write_training_corpus(root / "corpus")
    path = root / "preset.yaml"
    path.write_text(PRESET.format(corpus=corpus), encoding="utf-8")
    return path


def _launcher(processes: int) -> list[str]:
    # --standalone: a rendezvous on a free local port, so tests can run side by side.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={processes}"]  # fmt: skip


def _command(preset, out, processes, stage, *extra):
    return [*_launcher(processes), "-m", "minifusion.train", "--config", str(preset),
            "--out", str(out), "--no-progress",
            "--deepspeed", str(REPO / f"configs/deepspeed/zero{stage}.json"), *extra]  # fmt: skip


def _launch(command: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _run(*args, **kwargs) -> str:
    return _launch(_command(*args, **kwargs)).stdout


def _losses(out: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, preset):
    """``straight_run(stage)``: an uninterrupted 2-process run (made once per stage), its printout."""
    runs: dict[int, tuple[Path, str]] = {}

    def get(stage: int) -> tuple[Path, str]:
        if stage not in runs:
            out = tmp_path_factory.mktemp(f"straight{stage}") / "run"
            runs[stage] = out, _run(preset, out, 2, stage)
        return runs[stage]

    return get


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_run_resumes_exactly_and_exports(preset, tmp_path, stage, straight_run):
    straight, printed = straight_run(stage)
    resumed = tmp_path / "resumed"
    assert f"DeepSpeed ZeRO-{stage} on 2 processes" in printed and "bits/character" in printed
    _run(preset, resumed, 2, stage, "--stop-at", "3")
    assert _losses(resumed)[-1][0] == 3
    printed = _run(preset, resumed, 2, stage)
    assert "resuming from" in printed and "step_000003" in printed
    assert _losses(resumed) == _losses(straight)  # exact, every step
    checkpoints = sorted(p.name for p in (straight / "checkpoints").iterdir())
    assert checkpoints == ["step_000003", "step_000006"]  # no temporary folder left behind
    meta = json.loads((straight / "checkpoints/step_000006/meta.json").read_text())
    assert (meta["world_size"], meta["zero_stage"], meta["data_position"]) == (2, stage, 6 * 2 * 2)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import minifusion  # noqa: F401  (registers the Auto classes)

    model = AutoModelForCausalLM.from_pretrained(straight / "model")
    tokenizer = AutoTokenizer.from_pretrained(straight / "model")
    ids = tokenizer("The river", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 5)
    # aux-loss-free balancing ran after each of the 6 steps: every bias moved by ±rate a step
    # (0 for an expert at exactly the mean load), from the load summed over both ranks
    nudges = model.model.layers[1].moe.router.expert_bias / 0.01
    assert nudges.abs().max() > 0 and nudges.abs().max() <= 6
    torch.testing.assert_close(nudges, nudges.round(), atol=1e-4, rtol=0)


def _dump_state(run: Path, processes: int, stage: int, out: Path) -> dict:
    command = [*_launcher(processes), str(REPO / "tests/dump_training_state.py"), str(run),
               str(REPO / f"configs/deepspeed/zero{stage}.json"), str(out)]  # fmt: skip
    _launch(command)
    return torch.load(out, weights_only=True)


def _loss_from_checkpoint(run: Path, checkpoint: Path, position: int, batch: int) -> float:
    """The loss of the global batch at ``position`` under the checkpoint's weights, on our own."""
    from minifusion import MiniFusionConfig
    from minifusion.distributed import model_from_zero_checkpoint
    from minifusion.training import BatchStream, compute_loss

    config = MiniFusionConfig.from_yaml(run / "config.yaml")
    model = model_from_zero_checkpoint(checkpoint, config)
    inputs, targets = BatchStream(run / "train.bin", 16, batch, position=position).next_batch()
    with torch.no_grad():
        return float(compute_loss(model.train(), inputs, targets).lm)


@pytest.mark.parametrize(("stage", "before", "after"), [(2, 2, 1), (3, 1, 2)])
def test_resume_at_another_world_size_carries_the_state_over(
    preset, tmp_path, stage, before, after
):
    # The global batch stays 4 sequences (per-rank batch × ranks) on both sides of the change.
    run = tmp_path / "run"
    _run(preset, run, before, stage, "--stop-at", "3", "--set", f"train.batch_size={4 // before}")
    saved = _dump_state(run, before, stage, tmp_path / "before.pt")  # same world size: plain load
    moved = _dump_state(run, after, stage, tmp_path / "after.pt")  # re-sharded via universal
    assert (run / "checkpoints/step_000003/universal").is_dir()
    assert saved["counters"] == {**moved["counters"], "world_size": before}
    assert saved["counters"]["step"] == 3 and saved["counters"]["adam_steps"] == [3.0]
    assert saved["parameters"].keys() == moved["parameters"].keys()
    for name, states in saved["parameters"].items():
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            assert torch.equal(states[key], moved["parameters"][name][key]), (name, key)
    assert sum(float(s["exp_avg_sq"].sum()) for s in saved["parameters"].values()) > 0  # not zeros

    printed = _run(preset, run, after, stage, "--set", f"train.batch_size={4 // after}")
    written_by = "1 process" if before == 1 else f"{before} processes"
    assert f"written by {written_by}; re-sharding it for {after}" in printed
    assert f"DeepSpeed ZeRO-{stage} on {after} process" in printed and "(fp32)" in printed
    losses = _losses(run)
    assert [step for step, _ in losses] == list(range(1, 7))
    # Step 4 is computed from the carried-over weights on the next 4 examples: recompute it here
    # from the original shards, in this process (equal up to the order of float sums).
    expected = _loss_from_checkpoint(run, run / "checkpoints/step_000003", 3 * 4, 4)
    assert losses[3][1] == pytest.approx(expected, rel=1e-5)
    assert all(math.isfinite(loss) for _, loss in losses[4:])
    # the gate history (summed over ranks) went into the checkpoint and came back on resume
    history = torch.load(run / "checkpoints/step_000006/gate_monitor.pt", weights_only=True)
    assert history["layers"] == [0, 1] and history["steps"] == list(range(1, 7))
    assert [s["step"] for s in history["evaluations"]] == [3, 6]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last_train = [r for r in records if r["kind"] == "train"][-1]
    assert last_train["gate/layer1/mean"] == history["step_mean"][-1][1]


def test_sigterm_on_one_rank_stops_all_with_a_usable_checkpoint(preset, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    command = _command(preset, out, 2, 2, "--set", "train.max_steps=100000",
                       "--set", "train.save_every=100000", "--set", "train.eval_every=100000")  # fmt: skip
    child = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    try:
        deadline = time.time() + 300
        while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
            assert child.poll() is None, child.stdout.read()[-3000:]
            assert time.time() < deadline, "training never started"
            time.sleep(0.5)
        workers = subprocess.run(["pgrep", "-f", "-P", str(child.pid), "minifusion.train"],
                                 capture_output=True, text=True).stdout.split()  # fmt: skip
        assert workers, "no worker processes found"
        os.kill(int(workers[-1]), signal.SIGTERM)  # one rank only
        output, _ = child.communicate(timeout=300)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    assert child.returncode == 0, output[-3000:]
    assert "stopped by" in output
    latest = sorted((out / "checkpoints").glob("step_*"))[-1]
    meta = json.loads((latest / "meta.json").read_text())
    assert meta["step"] >= 1 and (latest / "deepspeed").is_dir()
    assert torch.load(latest / "rng_rank1.pt", weights_only=True)["torch"].dtype == torch.uint8


def test_a_streamed_corpus_trains_on_two_ranks(preset, tmp_path):
    out = tmp_path / "run"
    printed = _run(preset, out, 2, 2, "--set", "data.streaming=true",
                   "--set", "data.val_documents=1", "--set", "train.max_steps=3")  # fmt: skip
    assert "Prepared a streamed corpus" in printed and "bits/character" in printed
    meta = json.loads((out / "checkpoints/step_000003/meta.json").read_text())
    assert meta["data_position"] == 3 * 2 * 2 and not (out / "train.bin").exists()


def test_non_finite_steps_are_skipped_then_stop_the_run(preset, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    command = _command(preset, out, 2, 2, "--set", "train.lr=1e4", "--set", "train.warmup_steps=0",
                       "--set", "train.max_bad_steps=2", "--set", "train.max_steps=30")  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "2 steps in a row had a non-finite loss or gradient" in done.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first_bad = next(r for r in records if not math.isfinite(r["loss"]))
    assert first_bad["skipped_steps"] == 1  # skipped and counted, not crashed
    assert first_bad["lr"] < records[0]["lr"]  # the schedule moved on (cosine from step 0)


@pytest.mark.parametrize("setting, problem, fix", [
    ("train.precision=fp16", "train.precision=fp16 is for single-process training",
     "Use train.precision=bf16"),
    ("train.loss_chunk_rows=64", "train.loss_chunk_rows=64 is for single-process training",
     "Set train.loss_chunk_rows=0 under torchrun"),
])  # fmt: skip
def test_single_process_settings_are_refused_under_deepspeed_with_the_fix(
    preset, tmp_path, setting, problem, fix
):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    command = _command(preset, tmp_path / "run", 1, 2, "--set", setting)
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert problem in done.stderr and fix in done.stderr


def test_finish_distributed_leaves_the_group_and_keeps_the_last_barrier(tmp_path, monkeypatch):
    from minifusion import distributed

    monkeypatch.setattr(distributed, "_FINAL_BARRIER", [])
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}",
                                         rank=0, world_size=1)  # fmt: skip
    distributed.finish_distributed()
    assert not torch.distributed.is_initialized()
    # The main thread, not gloo's worker, must drop the barrier's work (finish_distributed says why)
    [barrier] = distributed._FINAL_BARRIER
    assert barrier.is_completed()


def test_deepspeed_loads_its_op_with_the_environments_build_tools(tmp_path, monkeypatch):
    # DeepSpeed builds its CPU comm op with the `ninja` it finds on PATH. From a plain shell that
    # can be the system's, whose build log the environment's ninja (which `make` and
    # build_extensions use) cannot read: each switch between them rebuilt the op (~30 s).
    import deepspeed

    from minifusion import distributed

    first_on_path = []

    def fake_init_distributed(dist_backend, verbose):
        first_on_path.append(os.environ["PATH"].split(os.pathsep)[0])
        torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}",
                                             rank=0, world_size=1)  # fmt: skip

    monkeypatch.setattr(deepspeed, "init_distributed", fake_init_distributed)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    try:
        assert distributed.init_distributed()[:2] == (0, 1)
    finally:
        torch.distributed.destroy_process_group()
    assert first_on_path == [str(Path(sys.executable).parent)]
    assert os.environ["PATH"] == "/usr/bin:/bin"  # only while DeepSpeed sets up
