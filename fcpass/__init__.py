"""fcpass: fuse tensor-parallel collectives into the matmuls beside them.

``import fcpass`` registers the ``torch.ops.fcpass.*`` fused ops: the
runtime. Neither torch_npu nor vLLM is imported here (both are optional),
nor the graph rewrite: the pass is ``passes.FlashCommPass``, which imports
this package, never the other way round.
"""

from fcpass import ascend as _ascend  # noqa: F401  (registers torch.ops.fcpass.drop_token_padding)
from fcpass import ops as _ops  # noqa: F401  (registers torch.ops.fcpass.*)
from fcpass import shards as _shards  # noqa: F401  (registers torch.ops.fcpass.token_shard)
from fcpass.config import PassConfig
from fcpass.guard import decision_counts, reset_decision_counts
from fcpass.dispatch import configure, eager_config

__all__ = [
    "PassConfig",
    "configure",
    "eager_config",
    "decision_counts",
    "reset_decision_counts",
]
