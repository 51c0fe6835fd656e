"""MiniFusion — build, check and train a hybrid Mamba ∥ attention language model.

Each module is one chapter of the course (see the README's chapter table):
``utils`` (00), ``config`` (01), ``tokenizer`` and ``data`` (02–03), ``embedding`` (03), …
"""

from .config import MiniFusionConfig
from .utils import environment_report, pick_device, seed_everything

__version__ = "0.1.0"

__all__ = ["MiniFusionConfig", "environment_report", "pick_device", "seed_everything"]
