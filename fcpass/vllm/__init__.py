"""fcpass in vLLM: the compilation config users pass, the plugin entry point, the pass as vLLM takes it.

Sits on top of the runtime (``fcpass``) and the rewrite (``passes``); only its
``state`` module (vLLM's private state, read without importing vLLM) is read
by those two. vLLM itself is imported inside functions or by the modules that
need it (``inductor_pass``, ``plugin``), never by ``import fcpass.vllm``.

    llm = vllm.LLM(..., compilation_config=fcpass.vllm.compilation_config(fcpass.PassConfig(...)))
"""

from fcpass.vllm.compilation import (
    ADDITIONAL_CONFIG_KEY,
    ASCEND_PASS_KEY,
    POST_GRAD_PASS_KEY,
    compilation_config,
    install_from_additional_config,
    make_pass,
    pass_key,
)

__all__ = [
    "ADDITIONAL_CONFIG_KEY",
    "ASCEND_PASS_KEY",
    "POST_GRAD_PASS_KEY",
    "compilation_config",
    "install_from_additional_config",
    "make_pass",
    "pass_key",
]
