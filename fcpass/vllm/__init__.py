"""fcpass in vLLM: the compilation config users pass, the plugin entry point, the pass as vLLM takes it.

Sits on top of the runtime (``fcpass``) and the rewrite (``passes``); only its
``state`` module (vLLM's private state, read without importing vLLM) is read
by those two, so this package's names load lazily: the runtime importing
``fcpass.vllm.state`` loads nothing else of it. vLLM itself is imported
inside functions or by the modules that need it (``inductor_pass``,
``plugin``), never by ``import fcpass.vllm``.

    llm = vllm.LLM(..., compilation_config=fcpass.vllm.compilation_config(fcpass.PassConfig(...)))
"""

__all__ = [
    "ADDITIONAL_CONFIG_KEY",
    "ASCEND_PASS_KEY",
    "POST_GRAD_PASS_KEY",
    "compilation_config",
    "install_from_additional_config",
    "make_pass",
    "pass_key",
]


def __getattr__(name: str):
    """``fcpass.vllm.<name>`` of ``fcpass.vllm.compilation``, imported on first use."""
    if name in __all__:
        from fcpass.vllm import compilation

        return getattr(compilation, name)
    raise AttributeError(f"module 'fcpass.vllm' has no attribute {name!r}")
