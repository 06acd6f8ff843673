"""Test-only stand-in for the parts of vllm-ascend fcpass reads: its FlashComm v1 collectives
(``torch.ops.vllm.maybe_pad_and_reduce`` / ``maybe_all_gather_and_maybe_unpad``, in
``register_custom_ops``) and the forward-context proxy that carries ``pad_size``
(``ascend_forward_context._EXTRA_CTX``). Same qualified names and semantics as
vllm-ascend's (TP path, no EP/DP), over vLLM's real TP group. Never shipped.
"""
