"""lm-evaluation-harness tasks over the local corpus (chapter 17).

``lm_eval --include_path $(python -m minifusion.lm_eval_tasks) --tasks minifusion ...`` finds
the YAML files of this folder. Every task reads the plays the pretraining split held out
(``minifusion.data.split_documents``, 10 % of the works with seed 0, as ``configs/tiny.yaml``
holds out), so no hub download is needed and a model is scored on text it never trained on:

* ``minifusion_next_line`` — a cloze: four turns of dialogue, then which of four lines comes
  next (the true one and three others from the same play), scored by log-likelihood;
* ``minifusion_is_question``, ``minifusion_next_speaker`` and ``minifusion_who_said`` —
  chapter 17's instruction tasks,
  asked in its chat format and scored by exact match of the generated answer.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent

__all__ = ["TASKS_DIR"]
