"""One module per device family; ``select_backend`` picks one per call.

Selection reads the config and the tensor's device type only (the same on
every rank), so every rank of a group picks the same backend.
"""

from __future__ import annotations

import torch

from fcpass.backends.base import Backend, FusedCall
from fcpass.backends.cuda import CudaBackend
from fcpass.backends.generic import GenericBackend
from fcpass.backends.npu import NpuBackend

_BACKENDS: dict[str, Backend] = {
    "generic": GenericBackend(),
    "npu": NpuBackend(),
    "cuda": CudaBackend(),
}


def get_backend(name: str) -> Backend:
    return _BACKENDS[name]


def select_backend(choice: str, device: torch.device) -> Backend | None:
    """The backend for ``choice`` ("auto" resolves by device); None for "off"."""
    if choice == "off":
        return None
    if choice != "auto":
        return _BACKENDS[choice]
    return _BACKENDS.get(device.type, _BACKENDS["generic"])


__all__ = ["Backend", "FusedCall", "get_backend", "select_backend"]
