"""vllm-ascend's per-forward extra context: whether FlashComm v1 runs, and the token padding it adds."""

import types

_EXTRA_CTX = types.SimpleNamespace(flash_comm_v1_enabled=True, pad_size=0)


def set_tokens(num_tokens: int, tp_size: int, enabled: bool = True) -> None:
    """What vllm-ascend sets per forward: pad the token count up to a multiple of the TP size."""
    _EXTRA_CTX.flash_comm_v1_enabled = enabled
    _EXTRA_CTX.pad_size = (tp_size - num_tokens % tp_size) % tp_size if enabled else 0
