"""vLLM's own pass registration, ``VllmBackend.configure_post_pass``, run on a given pass manager."""

from __future__ import annotations

import copy
import types


def configure_post_pass(vllm_config, manager, key: str):
    """Run vLLM's VllmBackend.configure_post_pass (the real registration code) with ``manager`` under ``key``
    (vLLM's PostGradPassManager, vllm-ascend's GraphFusionPassManager); returns the manager."""
    from vllm.compilation.backends import VllmBackend
    from vllm.config import set_current_vllm_config

    backend = types.SimpleNamespace(
        pass_key=key, vllm_config=vllm_config, compilation_config=vllm_config.compilation_config,
        inductor_config=copy.deepcopy(vllm_config.compilation_config.inductor_compile_config), pass_manager=manager)
    with set_current_vllm_config(vllm_config):
        VllmBackend.configure_post_pass(backend)
    assert backend.inductor_config[key] is manager
    return manager
