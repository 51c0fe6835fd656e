"""``python -m minifusion.lm_eval_tasks`` prints the folder to pass to ``lm_eval --include_path``."""

from . import TASKS_DIR

print(TASKS_DIR)
