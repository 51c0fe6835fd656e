"""Launched by test_distributed under torchrun: resume a run's newest checkpoint, dump its state.

``python -m torch.distributed.run --nproc_per_node=N tests/dump_training_state.py RUN ZERO_JSON OUT``
builds the run's model and :class:`~minifusion.distributed.DeepSpeedTrainer` exactly as the
training script does (from ``RUN/config.yaml`` and the prepared data), resumes — at whatever
world size it is launched with — and has rank 0 save the gathered weights, Adam moments and
counters to ``OUT`` without training a step.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from minifusion.config import MiniFusionConfig
from minifusion.distributed import DeepSpeedTrainer, finish_distributed
from minifusion.model import MiniFusionForCausalLM
from minifusion.tokenizer import load_tokenizer
from minifusion.train import load_settings
from minifusion.training import TrainConfig
from minifusion.utils import seed_everything


def main(run: Path, zero_json: str, out: Path) -> None:
    settings = load_settings(run / "config.yaml")
    config = TrainConfig.from_dict(settings["train"])
    seed_everything(config.seed + 1)  # a different initialisation: the checkpoint must overwrite it
    model = MiniFusionForCausalLM(MiniFusionConfig.from_yaml(run / "config.yaml"))
    trainer = DeepSpeedTrainer(model, load_tokenizer(run / "tokenizer"), run / "train.bin",
                               run / "val.bin", config, run, deepspeed_config_path=zero_json,
                               progress=False, verbose=False)  # fmt: skip
    state = trainer.training_state()
    if trainer.is_main:
        counters = {"step": trainer.step, "data_position": trainer.batches.position,
                    "lr": trainer.optimizer.param_groups[0]["lr"],
                    "world_size": trainer.world_size,
                    "adam_steps": sorted({float(s["step"]) for s in
                                          trainer.optimizer.optimizer.state.values()})}  # fmt: skip
        torch.save({"parameters": state, "counters": counters}, out)
    finish_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]))
