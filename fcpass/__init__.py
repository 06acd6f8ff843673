"""fcpass: fuse tensor-parallel collectives into the matmuls beside them.

``import fcpass`` registers the ``torch.ops.fcpass.*`` fused ops. Neither
torch_npu nor vLLM is imported here: both are optional.
"""

from fcpass import ascend as _ascend  # noqa: F401  (registers torch.ops.fcpass.drop_token_padding)
from fcpass import ops as _ops  # registers torch.ops.fcpass.*
from fcpass.config import PassConfig
from fcpass.guard import decision_counts, reset_decision_counts
from fcpass.ops import configure, runtime_config



def __getattr__(name):
    # The pass lives in `passes`, which imports fcpass; importing it here lazily
    # keeps `import fcpass` free of the pattern matcher (and of vLLM).
    if name == "FlashCommPass":
        from passes import FlashCommPass

        return FlashCommPass
    raise AttributeError(f"module 'fcpass' has no attribute {name!r}")


__all__ = [
    "FlashCommPass",
    "PassConfig",
    "configure",
    "runtime_config",
    "decision_counts",
    "reset_decision_counts",
]
