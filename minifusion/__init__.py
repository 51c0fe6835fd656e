"""MiniFusion — build, check and train a hybrid Mamba ∥ attention language model.

Each module holds one idea of one chapter (see the README's chapter table): ``utils`` (00),
``config`` with ``config_checks`` and ``config_costs`` (01), ``tokenizer`` and ``corpus`` (02),
``token_files``, ``data`` and ``embedding`` (03), ``norm`` (04), ``rope`` (05), ``attention``
and ``local_attention`` (06), ``mlp`` (07), ``moe`` (08), ``selective_scan``, ``fused_scan``
and ``mamba`` (09), ``fusion`` (10), ``model`` and ``blocks`` (11), ``train_config``, ``optim``,
``precision``, ``batches``, ``evaluation``, ``metrics`` and ``training`` (12), …

Importing the package registers ``MiniFusionConfig`` and ``MiniFusionForCausalLM`` with
transformers' ``AutoConfig`` and ``AutoModelForCausalLM``.
"""

from .attention import Attention, LayerKVCache
from .config import MiniFusionConfig
from .fusion import GatedFusion
from .mamba import MambaMixer, MambaState
from .mlp import SwiGLU
from .model import MiniFusionForCausalLM, MiniFusionModel
from .moe import MoE
from .norm import RMSNorm
from .rope import RotaryEmbedding, apply_rotary
from .utils import environment_report, pick_device, seed_everything

__version__ = "0.1.0"

__all__ = [
    "Attention",
    "GatedFusion",
    "LayerKVCache",
    "MambaMixer",
    "MambaState",
    "MiniFusionConfig",
    "MiniFusionForCausalLM",
    "MiniFusionModel",
    "MoE",
    "RMSNorm",
    "RotaryEmbedding",
    "SwiGLU",
    "apply_rotary",
    "environment_report",
    "pick_device",
    "seed_everything",
]
