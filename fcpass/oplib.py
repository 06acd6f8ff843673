"""Defining ``torch.ops.fcpass.*``: schema from the function's annotations, the function as every device's kernel.

Why not ``torch.library.custom_op``: it puts an autograd layer and a
dynamo-disable frame between the dispatcher and the kernel, ~10-15 us per
call (benchmarks/guard.py). The fused ops are inference-only and run on every
forward step, decode included, where that is the price of the whole
unfused path. Defined here, the kernel is one dispatcher hop away; inputs
that require grad get PyTorch's "autograd not implemented" fallback.
"""

from __future__ import annotations

import torch


class OpLibrary:
    """One op namespace: :meth:`define` an op from a typed function, :meth:`fake` its tracing impl."""

    def __init__(self, namespace: str):
        self.namespace = namespace
        self._library = torch.library.Library(namespace, "FRAGMENT")

    def define(self, name: str):
        """Decorator: ``<namespace>::<name>`` with the function as its kernel on every device (returned as is).

        The op returns new tensors only (no input mutated, no view of an input).
        """
        def register(fn):
            self._library.define(name + torch.library.infer_schema(fn, mutates_args=()))
            self._library.impl(name, fn, "CompositeExplicitAutograd")
            return fn

        return register

    def fake(self, name: str):
        """Decorator: the fake (meta) impl of ``<namespace>::<name>``, run when tracing: shapes and dtypes only."""
        return torch.library.register_fake(f"{self.namespace}::{name}", lib=self._library)


FCPASS = OpLibrary("fcpass")
define, fake = FCPASS.define, FCPASS.fake
