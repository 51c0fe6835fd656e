"""ZeRO helpers: the DeepSpeed config built from TrainConfig, and memory per GPU."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from minifusion import MiniFusionConfig
from minifusion.training import TrainConfig
from minifusion.zero import (
    activation_bytes_per_token,
    bytes_per_parameter,
    deepspeed_config,
    memory_per_gpu,
)
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

    def parts(estimate):
        return [estimate.parameters, estimate.gradients, estimate.master, estimate.optimizer]

    assert parts(ddp) == pytest.approx([4 * n, 4 * n, 0, 8 * n])  # AdamW on the weights
    # ZeRO-1 ends the backward pass with every gradient (4n); at the step it holds 1/8 of them
    # and their fp32 copy (8n/8). DeepSpeed's fp32 master partition is sharded from stage 1 on.
    assert parts(z1) == pytest.approx([4 * n, 4 * n, 4 * n / 8, 8 * n / 8])
    assert parts(z2) == pytest.approx([4 * n, 8 * n / 8, 4 * n / 8, 8 * n / 8])
    assert parts(z3) == pytest.approx([4 * n / 8, 8 * n / 8, 4 * n / 8, 8 * n / 8])
    assert ddp.activations == z3.activations == 2 * 128 * 1000.0  # ZeRO does not shard them
    ckpt = memory_per_gpu(config, stage=2, activation_checkpointing=True, **kw)
    layers = config.num_hidden_layers
    assert ckpt.activations == 2 * 128 * (layers * 4 * config.hidden_size + 1000.0 / layers)


def test_bytes_per_parameter_table():
    for stage in (1, 2, 3):  # on one GPU nothing is sharded: every ZeRO stage holds the same
        assert sum(bytes_per_parameter(stage, 1).values()) == 24  # 4 + (4 + 4) + 4 + 8
        assert sum(bytes_per_parameter(stage, 1, weight_bytes=2).values()) == 20  # 2 + 6 + 4 + 8
    assert sum(bytes_per_parameter(0, 64).values()) == 16
    assert bytes_per_parameter(1, 2, weight_bytes=2)["gradients"] == 3  # (2 + 4)/2 > 2
    assert bytes_per_parameter(1, 4, weight_bytes=2)["gradients"] == 2  # the whole bf16 grads
    assert sum(bytes_per_parameter(3, 8).values()) == 3  # 24/8
    with pytest.raises(ValueError, match="fp32 weights only"):
        bytes_per_parameter(0, 1, weight_bytes=2)
    with pytest.raises(ValueError, match="weight_bytes"):
        bytes_per_parameter(2, 1, weight_bytes=1)


@pytest.mark.parametrize("gpus", [1, 2, 8, 64])
def test_16_bit_weights_agree_with_deepspeeds_estimators(gpus):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    n, largest_layer = 1_546_873_344, 49_152_000  # fusiontree-1.5b and its embedding

    def states(stage):
        return n * sum(bytes_per_parameter(stage, gpus, weight_bytes=2).values())

    _, zero2 = estimate_zero2_model_states_mem_needs(n, num_gpus_per_node=gpus, cpu_offload=False)
    assert states(2) == pytest.approx(zero2, abs=1)  # 2Ψ + 18Ψ/G, as the estimator says
    _, zero3, gathered = estimate_zero3_model_states_mem_needs(
        n, largest_layer, num_gpus_per_node=gpus, cpu_offload=False
    )
    # The stage-3 estimator counts 18Ψ/G (+ 4 bytes × the largest layer, gathered whole). Its
    # code holds 2Ψ/G more: the 16-bit parameter partition (lp_param_buffer), 16-bit + fp32
    # gradients, fp32 master, two moments: 2 + 2 + 4 + 4 + 8 = 20. The live test below measures it.
    assert states(3) == pytest.approx(zero3 - gathered + 2 * n / gpus, abs=1)


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
    expected = MiniFusionConfig.from_preset("tiny").estimate_parameters()
    assert lines[0].startswith(f"tiny: {expected:,} parameters")
    assert len(lines) == 9 and sum("(ckpt)" in line for line in lines) == 4
    for flags, message in ((["--gpus", "0"], "--gpus must be ≥ 1, not 0."),
                           (["--preset", "tinyy"], "tinyy")):  # fmt: skip
        with pytest.raises(SystemExit) as stop:  # an argparse error line, not a traceback
            main(flags)
        assert stop.value.code == 2 and message in capsys.readouterr().err


def _lock(root: Path, extension: str, age_seconds: float) -> Path:
    lock = root / extension / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    stamp = lock.stat().st_mtime - age_seconds
    os.utime(lock, (stamp, stamp))
    return lock


def test_a_build_lock_left_by_a_killed_process_is_named_instead_of_waited_on(tmp_path):
    from minifusion.extensions import (
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
    from minifusion.extensions import STALE_BUILD_LOCK_SECONDS
    from minifusion.train import main

    stale = _lock(tmp_path, "deepspeed_shm_comm", age_seconds=STALE_BUILD_LOCK_SECONDS * 2)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    code = main(["--config", str(config), "--out", str(tmp_path / "run"),
                 "--deepspeed", str(CONFIGS / "zero2.json")])  # fmt: skip
    assert code == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and str(stale) in error and "30 minutes" in error


# ----------------------------------------------------------------------------------------------
# The table against the tensors a live DeepSpeed engine and its checkpoint hold (one process)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_process():
    """A 1-process gloo group, as torchrun would set it up, torn down after this module."""
    pytest.importorskip("deepspeed")
    import socket

    import torch.distributed as dist

    from minifusion.distributed import init_distributed

    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.MonkeyPatch.context() as env:
        for key, value in dict(RANK=0, LOCAL_RANK=0, WORLD_SIZE=1, LOCAL_WORLD_SIZE=1,
                               MASTER_ADDR="127.0.0.1", MASTER_PORT=port).items():  # fmt: skip
            env.setenv(key, str(value))
        init_distributed()  # refuses a stale extension build lock instead of hanging on it
        yield
        dist.destroy_process_group()


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one buffer count once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in tensors if t is not None}  # fmt: skip
    return sum(storages.values())


def _pointers(tensors) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


def _held_through_one_step(engine, zero, loss_of) -> dict[str, int]:
    """Bytes a 1-process ZeRO engine holds, by :func:`bytes_per_parameter`'s parts.

    On one GPU the gradients peak at the step: all of them (this GPU's share) and their fp32
    copy for AdamW, made while they are still held.
    """
    stage3 = hasattr(zero, "fp32_partitioned_groups_flat")
    engine.backward(loss_of(engine))
    assert all(p.grad is None for p in engine.module.parameters())  # DeepSpeed holds them now
    if stage3:
        after_backward = [zero.grad_partitions_flat_buffer]
    else:
        after_backward = [t for group in zero.averaged_gradients.values() for t in group]
    adam, at_step = zero.optimizer, []  # the torch AdamW DeepSpeed steps, one group at a time

    def step_and_record(*args, **kwargs):
        at_step.extend(p.grad for group in adam.param_groups for p in group["params"])
        return type(adam).step(adam, *args, **kwargs)

    adam.step = step_and_record
    engine.step()
    del adam.step
    assert at_step and not _pointers(at_step) & _pointers(after_backward)  # a copy, not a view
    if stage3:
        weights, master = [zero.lp_param_buffer], zero.fp32_partitioned_groups_flat
    else:
        weights, master = zero.bit16_groups_flat, zero.single_partition_of_fp32_groups
        assert _pointers(engine.module.parameters()) == _pointers(weights)
    assert not _pointers(master) & _pointers(weights)  # a clone, even of fp32 weights
    moments = [state[key] for state in adam.state.values() for key in ("exp_avg", "exp_avg_sq")]
    return {
        "parameters": _storage_bytes(weights),
        "gradients": _storage_bytes(after_backward) + _storage_bytes(at_step),
        "master": _storage_bytes(master),
        "optimizer": _storage_bytes(moments),
    }


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_live_engine_and_its_checkpoint_hold_what_the_table_says(one_process, tmp_path, stage):
    import deepspeed

    from minifusion import MiniFusionForCausalLM
    from minifusion.training import build_optimizer

    torch.manual_seed(0)
    model = MiniFusionForCausalLM(small_config())
    n = model.num_parameters()
    train = TrainConfig(batch_size=2)
    optimizer = build_optimizer(model, train)
    for group in optimizer.param_groups:  # as DeepSpeedTrainer does
        group.pop("param_names", None)
    config = deepspeed_config(CONFIGS / f"zero{stage}.json", train, world_size=1,
                              autocast_dtype=torch.bfloat16)  # fmt: skip
    engine, zero, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    held = _held_through_one_step(engine, zero, lambda e: e(ids, labels=ids).loss)
    expected = {part: n * size for part, size in bytes_per_parameter(stage, 1).items()}
    assert held == pytest.approx(expected, rel=1e-3)  # DeepSpeed pads each group a little
    assert sum(held.values()) == pytest.approx(24 * n, rel=1e-3)

    # The optimizer shard of a checkpoint: the fp32 master partition and both moments.
    engine.save_checkpoint(str(tmp_path), tag="step")
    (shard,) = (tmp_path / "step").glob("*optim_states.pt")
    saved = torch.load(shard, weights_only=False)["optimizer_state_dict"]
    master = saved["fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"]
    adam = saved["optimizer_state_dict" if stage == 3 else "base_optimizer_state"]["state"]
    moments = [state[key] for state in adam.values() for key in ("exp_avg", "exp_avg_sq")]
    assert _storage_bytes(master) == held["master"] == pytest.approx(4 * n, rel=1e-3)
    assert _storage_bytes(moments) == held["optimizer"]
    engine.destroy()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_live_engine_with_16_bit_weights_holds_what_the_table_says(one_process, stage):
    """DeepSpeed's own bf16 mode (what its estimators assume), on a model that runs in bf16."""
    import deepspeed

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(),
                                torch.nn.Linear(128, 64), torch.nn.LayerNorm(64))  # fmt: skip
    n = sum(p.numel() for p in model.parameters())
    matrices = [p for p in model.parameters() if p.ndim == 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": matrices}, {"params": vectors, "weight_decay": 0.0}]
    config = json.loads((CONFIGS / f"zero{stage}.json").read_text())
    del config["torch_autocast"]
    config.update(bf16={"enabled": True}, train_micro_batch_size_per_gpu=2,
                  gradient_accumulation_steps=1, steps_per_print=2**31 - 1)  # fmt: skip
    engine, zero, _, _ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(groups), config=config
    )
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    held = _held_through_one_step(engine, zero, lambda e: e(x).float().pow(2).mean())
    expected = {
        part: n * size for part, size in bytes_per_parameter(stage, 1, weight_bytes=2).items()
    }
    assert held == pytest.approx(expected, rel=1e-3)
    assert sum(held.values()) == pytest.approx(20 * n, rel=1e-3)  # the estimators: 2Ψ + 18Ψ/G
    engine.destroy()


def test_branch_checkpointing_keeps_fewer_activations_than_none():
    config = MiniFusionConfig.from_preset("tiny").replaced(
        mixer_types=["hybrid"] * 4, ffn_types=["dense"] * 4
    )
    full = activation_bytes_per_token(config, seq_len=64)
    branches = activation_bytes_per_token(config, seq_len=64, checkpoint_branches=True)
    layer_input = config.hidden_size * 2  # whole-layer checkpointing keeps a bf16 input only
    assert layer_input < branches < 0.8 * full
