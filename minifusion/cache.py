"""Chapter 11 — the hybrid cache: everything a MiniFusion model remembers while generating.

Per layer, whatever its mixer needs:

* attention (and the attention branch of a hybrid layer): a :class:`~minifusion.attention.
  LayerKVCache` — every key/value for the global heads (in a buffer that grows by eighths), only
  the last ``sliding_window`` for the local heads (in a ring of that many slots);
* Mamba (and the Mamba branch of a hybrid layer): a :class:`~minifusion.mamba.MambaState` — the
  conv buffer and the scan state, the same size whatever the length.

``model.generate()`` creates one :class:`HybridCache` per call (see
``MiniFusionForCausalLM.prepare_inputs_for_generation``) and hands it from step to step.
"""

from dataclasses import dataclass

import torch

from .attention import LayerKVCache
from .mamba import MambaState

__all__ = ["HybridCache", "LayerCache"]


@dataclass
class LayerCache:
    """The cache of one layer: ``kv`` for its attention branch, ``mamba`` for its Mamba branch."""

    kv: LayerKVCache | None = None
    mamba: MambaState | None = None


class HybridCache:
    """One :class:`LayerCache` per decoder layer and the number of tokens already processed."""

    # What ``generate()`` asks of a cache handed to it (transformers' ``Cache`` interface, the
    # parts it reads): ours grows with the sequence, so ``torch.compile``'s static-shape path
    # cannot capture it.
    is_compileable = False

    def __init__(self, model, batch_size: int, max_length: int | None = None):
        """``model``: a ``MiniFusionModel`` (its layers say which states each needs).

        ``max_length``: the most tokens this cache will see (prompt + generated), if known:
        the global heads' buffers are then allocated once at that size instead of growing.
        """
        self.layers = [
            LayerCache(
                kv=layer.attn.new_cache() if layer.attn is not None else None,
                mamba=layer.mamba.new_state(batch_size) if layer.mamba is not None else None,
            )
            for layer in model.layers
        ]
        self.seen_tokens = 0
        if max_length is not None:
            for cache in self.layers:
                if cache.kv is not None:
                    cache.kv.reserve(max_length)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    @property
    def is_linear(self) -> list[bool]:
        """Per layer: does it keep only a fixed-size recurrent state (a Mamba-only layer)?
        ``generate()`` reads this to decide whether a prompt it is handed again must be cut
        to the tokens this cache has not seen."""
        return [c.kv is None for c in self.layers]

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held, split into attention KV and Mamba state."""
        kv = sum(c.kv.memory_bytes() for c in self.layers if c.kv is not None)
        mamba = sum(c.mamba.memory_bytes for c in self.layers if c.mamba is not None)
        return {"kv": kv, "mamba": mamba}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep the batch rows ``beam_idx`` (beam search)."""
        for cache in self.layers:
            if cache.kv is not None:
                cache.kv.reorder(beam_idx)
            if cache.mamba is not None:
                cache.mamba.reorder(beam_idx)
