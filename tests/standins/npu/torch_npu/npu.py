"""``torch.npu`` as vllm-ascend 0.23 reads it (streams, events, the current device), on a CPU rank.

Signatures are torch-npu 2.10.0.post4's (vllm-ascend 0.23.0.post1's pin), read from its wheel's
``torch_npu/npu/`` sources (tests/runtime/test_npu_standin_schemas.py compares them): nothing here that
the real module lacks. There is no NPU here: ``is_available()`` is False (transformers asks, once
torch_npu imports), and no stream is ever capturing a graph. A CPU rank runs one stream in order, so a
stream or event is only a handle: waiting, recording and synchronizing have nothing to wait for.
"""

from __future__ import annotations


class Stream:
    """An NPU stream handle: work on a CPU rank runs in order, so every stream is the one stream."""

    def __new__(cls, device=None, priority=0, **kwargs):
        stream = super().__new__(cls)
        stream.device, stream.priority = device, priority
        return stream

    def wait_event(self, event):
        pass

    def wait_stream(self, stream):
        pass

    def record_event(self, event=None):
        event = event if event is not None else Event()
        event.record(self)
        return event

    def query(self):
        return True

    def synchronize(self):
        pass


class Event:
    """An NPU event handle: recorded work on a CPU rank is done when recorded."""

    def __new__(cls, enable_timing=False, blocking=False, interprocess=False):
        event = super().__new__(cls)
        event.enable_timing, event.blocking, event.interprocess = enable_timing, blocking, interprocess
        return event

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def query(self):
        return True

    def synchronize(self):
        pass


class ExternalEvent:
    def __new__(cls):
        return super().__new__(cls)

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def reset(self, stream=None):
        pass


class device:
    """``with torch.npu.device(i):`` on a CPU rank: there is one device, the CPU."""

    def __init__(self, device):
        self.idx = device

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


_CURRENT_STREAM = Stream()


def current_stream(device=None):
    return _CURRENT_STREAM


def current_device():
    return 0


def synchronize(device=None):
    pass


def empty_cache():
    pass


def is_available():
    return False


def device_count() -> int:
    return 0


def is_current_stream_capturing():
    return False
