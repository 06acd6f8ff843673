"""FlashCommPass as vLLM's pass managers take it.

vLLM's PostGradPassManager accepts an InductorPass, vllm-ascend's
GraphFusionPassManager only a VllmInductorPass; FlashCommPass itself is a
plain Inductor CustomGraphPass (the rewrite imports no vLLM), so this is the
pass with vLLM's base class added.
"""

from __future__ import annotations

from vllm.compilation.passes.vllm_inductor_pass import VllmInductorPass

from fcpass.config import PassConfig
from passes import FlashCommPass


class VllmFlashCommPass(FlashCommPass, VllmInductorPass):
    """FlashCommPass, also a ``VllmInductorPass`` (so also InductorPass's ``is_applicable_for_range``).

    ``VllmInductorPass.__init__`` (which wants a VllmConfig) is not called: the
    pass needs none of its state, only its type.
    """

    def __init__(self, config: PassConfig | None = None) -> None:
        FlashCommPass.__init__(self, config)
