"""FlashCommPass as vLLM's pass managers take it.

vLLM's PostGradPassManager accepts an InductorPass, vllm-ascend's
GraphFusionPassManager only a VllmInductorPass; FlashCommPass itself is a
plain Inductor CustomGraphPass (the rewrite imports no vLLM), so this is the
pass with vLLM's base class added.
"""

from __future__ import annotations

import logging

from vllm.compilation.passes.vllm_inductor_pass import VllmInductorPass

from fcpass import traceable
from fcpass.config import PassConfig
from passes import FlashCommPass

logger = logging.getLogger(__name__)
_SAID: set[str] = set()  # the configs this process has said it holds


class VllmFlashCommPass(FlashCommPass, VllmInductorPass):
    """FlashCommPass, also a ``VllmInductorPass`` (so also InductorPass's ``is_applicable_for_range``).

    ``VllmInductorPass.__init__`` (which wants a VllmConfig) is not called: the
    pass needs none of its state, only its type. Built (or unpickled) in each
    process that compiles, before vLLM's first trace there, it makes
    ``dist.all_to_all_single`` into a buffer of another rank traceable
    (:mod:`fcpass.traceable`: vllm-ascend's FlashComm2 o_proj).
    """

    def __init__(self, config: PassConfig | None = None) -> None:
        FlashCommPass.__init__(self, config)
        traceable.install()

    def uuid(self) -> str:
        # vLLM asks for it in each process that sets up compilation (engine core, every worker), cold or warm
        _say_here(self.config)
        return FlashCommPass.uuid(self)


def _say_here(config: PassConfig) -> None:
    """Once per process and config, the startup line: the pass is in this process's compilation config, and when
    it runs."""
    text = config.runtime_text()
    if text not in _SAID:
        _SAID.add(text)
        logger.info("fcpass: FlashCommPass is in this process's compilation config (%s): it runs on each graph vLLM "
                    "compiles here; a graph vLLM loads from its compile cache runs fcpass's ops without it", text)
