"""fcpass: fuse tensor-parallel collectives into the matmuls beside them.

``import fcpass`` registers the ``torch.ops.fcpass.*`` fused ops. Neither
torch_npu nor vLLM is imported here: both are optional.
"""

from fcpass import ops as _ops  # registers torch.ops.fcpass.*
from fcpass.config import PassConfig
from fcpass.guard import decision_counts, reset_decision_counts
from fcpass.ops import configure, runtime_config

__all__ = [
    "PassConfig",
    "configure",
    "runtime_config",
    "decision_counts",
    "reset_decision_counts",
]
