"""ZeRO helpers: the DeepSpeed config built from TrainConfig, and memory per GPU."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from minifusion import MiniFusionConfig
from minifusion.training import TrainConfig
from minifusion.zero import activation_bytes_per_token, deepspeed_config, memory_per_gpu
from tests.test_model import small_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "deepspeed"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_shipped_configs_resolve_from_train_config(stage):
    train = TrainConfig(batch_size=4, grad_accum_steps=3, grad_clip=0.5)
    config = deepspeed_config(CONFIGS / f"zero{stage}.json", train, world_size=8,
                              autocast_dtype=torch.bfloat16)  # fmt: skip
    assert config["zero_optimization"]["stage"] == stage
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 3
    assert config["train_batch_size"] == 4 * 3 * 8
    assert config["gradient_clipping"] == 0.5
    assert config["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    fp32 = deepspeed_config(CONFIGS / f"zero{stage}.json", train, world_size=1, autocast_dtype=None)
    assert fp32["torch_autocast"]["enabled"] is False


@pytest.mark.parametrize(
    "key, value, owner",
    [("gradient_accumulation_steps", 4, "train.grad_accum_steps"),
     ("train_micro_batch_size_per_gpu", 2, "train.batch_size"),
     ("gradient_clipping", 1.0, "train.grad_clip"),
     ("optimizer", {"type": "AdamW"}, "build_optimizer"),
     ("bf16", {"enabled": True}, "torch_autocast")],
)  # fmt: skip
def test_a_second_source_of_truth_is_refused(tmp_path, key, value, owner):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, key: value}))
    with pytest.raises(ValueError, match=rf"sets '{key}'.*{owner}"):
        deepspeed_config(path, TrainConfig(), world_size=2, autocast_dtype=None)
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, key: "auto"}))
    assert deepspeed_config(path, TrainConfig(), world_size=2, autocast_dtype=None)


def test_bad_stage_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="stage must be 0, 1, 2 or 3"):
        deepspeed_config({"zero_optimization": {"stage": 4}}, TrainConfig(), world_size=1,
                         autocast_dtype=None)  # fmt: skip
    with pytest.raises(FileNotFoundError, match="zero2.json"):
        deepspeed_config(tmp_path / "nope.json", TrainConfig(), world_size=1, autocast_dtype=None)


def test_memory_per_gpu_shards_what_each_stage_shards():
    config = MiniFusionConfig.from_preset("small")
    n = config.estimate_parameters()
    kw = dict(gpus=8, batch_size=2, seq_len=128, activation_bytes=1000.0)
    ddp, z1, z2, z3 = (memory_per_gpu(config, stage=s, **kw) for s in (0, 1, 2, 3))
    assert ddp.model_states == 16 * n
    assert (z1.parameters, z1.gradients, z1.optimizer) == (4 * n, 4 * n, 8 * n / 8)
    assert (z2.parameters, z2.gradients, z2.optimizer) == (4 * n, 4 * n / 8, 8 * n / 8)
    assert z3.model_states == pytest.approx(16 * n / 8)
    assert ddp.activations == z3.activations == 2 * 128 * 1000.0  # ZeRO does not shard them
    ckpt = memory_per_gpu(config, stage=2, activation_checkpointing=True, **kw)
    layers = config.num_hidden_layers
    assert ckpt.activations == 2 * 128 * (layers * 4 * config.hidden_size + 1000.0 / layers)


def test_activation_bytes_grow_with_width_and_not_with_length_without_attention():
    narrow = small_config("mamba", hidden_size=32)
    wide = small_config("mamba", hidden_size=64)
    a32 = activation_bytes_per_token(narrow, seq_len=64)
    a64 = activation_bytes_per_token(wide, seq_len=64)
    assert 1.8 < a64 / a32 < 2.2  # everything a Mamba layer saves is linear in the width
    assert activation_bytes_per_token(narrow, seq_len=128) == pytest.approx(a32, rel=0.02)
    # A real training step keeps at least the layer's input-sized tensors for every layer.
    assert a32 > 4 * 32


def test_memory_table_command(capsys):
    from minifusion.zero import main

    assert main(["--preset", "tiny", "--gpus", "2", "--batch-size", "1", "--seq-len", "64"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("tiny: 1,869,440 parameters")
    assert len(lines) == 9 and sum("(ckpt)" in line for line in lines) == 4


def _lock(root: Path, extension: str, age_seconds: float) -> Path:
    lock = root / extension / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    stamp = lock.stat().st_mtime - age_seconds
    os.utime(lock, (stamp, stamp))
    return lock


def test_a_build_lock_left_by_a_killed_process_is_named_instead_of_waited_on(tmp_path):
    from minifusion.distributed import (
        STALE_BUILD_LOCK_SECONDS,
        StaleBuildLockError,
        check_build_locks,
    )

    check_build_locks(tmp_path / "never_built")  # no extensions folder yet: nothing to wait on
    _lock(tmp_path, "being_built_now", age_seconds=60)
    check_build_locks(tmp_path)  # a build in progress is left to finish
    stale = _lock(tmp_path, "deepspeed_shm_comm", age_seconds=STALE_BUILD_LOCK_SECONDS + 60)
    with pytest.raises(StaleBuildLockError, match=f"rm {stale}"):
        check_build_locks(tmp_path)


def test_the_training_command_reports_a_stale_build_lock(tmp_path, monkeypatch, capsys):
    from minifusion.distributed import STALE_BUILD_LOCK_SECONDS
    from minifusion.train import main

    stale = _lock(tmp_path, "deepspeed_shm_comm", age_seconds=STALE_BUILD_LOCK_SECONDS * 2)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    code = main(["--config", str(config), "--out", str(tmp_path / "run"),
                 "--deepspeed", str(CONFIGS / "zero2.json")])  # fmt: skip
    assert code == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and str(stale) in error and "30 minutes" in error
