"""torch.compile's trace of ``dist.all_to_all_single`` into a receive buffer of another rank.

Dynamo traces torch.distributed's in-place collectives by remapping each to a
functional collective and copying its result into the caller's buffer
(``torch.distributed._functional_collectives.traceable_collective_remaps``).
For ``all_to_all_single`` that result is shaped like the send buffer, so a
receive buffer holding the same elements in another rank fails the trace at
the copy, though eager torch takes it. vllm-ascend's FlashComm2 o_proj
(``Flashcomm2OProjRowParallelOp``) sends a 2-D buffer into a 1-D one: without
this, no graph of it ever reaches a pass, and its matmul -> reduce_scatter is
the site fcpass is for. PyTorch does the same reshape for
``all_gather_into_tensor`` (pytorch#177205); torch 2.10 to 2.13 lack it for
``all_to_all_single``.

Only that case changes: a buffer of the send buffer's rank gets torch's own
copy, so every graph torch already traced is traced as before. fcpass's vLLM
pass installs it in each process that holds the pass, before vLLM compiles.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch.distributed import _functional_collectives as funcol
from torch.distributed import distributed_c10d

logger = logging.getLogger(__name__)
_SAID_FOREIGN: set[str] = set()  # the foreign remaps this process has named (a pass is built per compile config)


def fcpass_all_to_all_inplace(output: torch.Tensor, input: torch.Tensor, output_split_sizes=None,
                              input_split_sizes=None, group=None, async_op: bool = False, tag: str = "") -> None:
    """torch's ``all_to_all_inplace`` (same arguments: Dynamo binds the eager call's to it), with the result
    reshaped to a receive buffer of another rank: eager torch fills that buffer's memory in the same order.
    Returns None, as the eager call does (torch 2.13's remap too; 2.10's returned the buffer)."""
    if async_op:
        raise AssertionError("Can't remap async version of inplace op to functional collective")
    group = group or dist.group.WORLD
    if group is None:
        raise AssertionError("group cannot be None")
    result = funcol.all_to_all_single(input, output_split_sizes, input_split_sizes, group, tag)
    if result.dim() != output.dim():
        result = result.reshape(output.shape)  # raises at trace time where the element counts differ
    output.copy_(result)


def install() -> bool:
    """Remap ``dist.all_to_all_single`` for Dynamo to :func:`fcpass_all_to_all_inplace`, once per process.

    Left as it is where something else than torch's own remap holds it (said once): False then. Torch's own is
    whatever its ``_functional_collectives`` defines (2.10: ``all_to_all_inplace``; 2.13:
    ``_remapped_all_to_all_single``, which calls it)."""
    remaps = funcol.traceable_collective_remaps
    current = remaps.get(distributed_c10d.all_to_all_single)
    if current is fcpass_all_to_all_inplace:
        return True
    if getattr(current, "__module__", None) != funcol.__name__:
        if repr(current) not in _SAID_FOREIGN:
            _SAID_FOREIGN.add(repr(current))
            logger.warning("fcpass: torch.compile's remap of dist.all_to_all_single is %r, not torch's own: "
                           "fcpass leaves it (a receive buffer of another rank may not trace)", current)
        return False
    # Dynamo reads the replacement back as an attribute of _functional_collectives, by its __name__
    setattr(funcol, fcpass_all_to_all_inplace.__name__, fcpass_all_to_all_inplace)
    remaps[distributed_c10d.all_to_all_single] = fcpass_all_to_all_inplace
    logger.debug("fcpass: torch.compile traces dist.all_to_all_single into a receive buffer of another rank")
    return True
