"""Defining ``torch.ops.fcpass.*``: schema from the function's annotations, the function as every device's kernel.

Why not ``torch.library.custom_op``: on top of the autograd layer it wraps
the kernel in a dynamo-disable frame; a do-nothing op typically costs
~17 us a call that way, ~11 us defined here (in inference mode, as vLLM runs
the model: ~6.8 against ~3.3 us; benchmarks/README.md, guard), and the
fused ops run on every forward step, decode included. The ops are
inference-only: a backward through one raises, naming it, rather than
flowing through its collectives (which have no gradient) into a silently
wrong number; without an autograd kernel at all PyTorch would only warn.
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
        qualname = f"{self.namespace}::{name}"

        def register(fn):
            self._library.define(name + torch.library.infer_schema(fn, mutates_args=()))
            self._library.impl(name, fn, "CompositeExplicitAutograd")
            torch.library.register_autograd(qualname, _no_backward(qualname), lib=self._library)
            return fn

        return register

    def fake(self, name: str):
        """Decorator: the fake (meta) impl of ``<namespace>::<name>``, run when tracing: shapes and dtypes only."""
        return torch.library.register_fake(f"{self.namespace}::{name}", lib=self._library)


def _no_backward(qualname: str):
    def backward(ctx, *grads):
        raise RuntimeError(f"{qualname} is inference-only: it has no backward (its collectives have no gradient)")

    return backward


FCPASS = OpLibrary("fcpass")
define, fake = FCPASS.define, FCPASS.fake
