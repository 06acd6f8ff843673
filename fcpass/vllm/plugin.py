"""The ``vllm.general_plugins`` entry point: fcpass for ``vllm serve --additional-config '{"fcpass": {...}}'``.

vLLM calls :func:`register` in every process it starts (API server, engine
core, workers), with no arguments, before it builds its config. It
registers the fcpass ops (workers run them) and makes every ``VllmConfig``
built afterwards install FlashCommPass when its ``additional_config`` has an
"fcpass" entry, validating the entry there, at startup. Without that entry
nothing changes. Where the platform will not run the installed pass at all
(vllm-ascend's npugraph_ex under full graph modes) it says so at WARNING; a
vLLM pass that takes the sites first (``fuse_allreduce_rms`` with fcpass's
sequence parallelism) is an error naming both settings.

vLLM gives general plugins no hook on its config, so this is the one place
fcpass wraps a vLLM method: ``VllmConfig.__post_init__``, once per process,
calling the original first. The pass then travels inside the config to the
engine and worker processes (it pickles by its PassConfig).
"""

from __future__ import annotations

import functools
import logging
import os

logger = logging.getLogger(__name__)

_WRAPPED_MARK = "_fcpass_installs_from_additional_config"


def register() -> None:
    import fcpass  # noqa: F401  (registers torch.ops.fcpass.*)
    from fcpass import versions

    _show_in_vllms_output()
    if not _installed_here():
        versions.check()  # once per process: vLLM may load plugins more than once
    _install_on_new_configs()


def _installed_here() -> bool:
    return getattr(_vllm_config_class().__post_init__, _WRAPPED_MARK, False)


def _vllm_config_class():
    """vLLM's ``VllmConfig``, or a plain error where this vLLM has none where fcpass looks."""
    try:
        from vllm.config import VllmConfig
    except ImportError as exc:
        import vllm

        from fcpass.versions import TESTED

        (low, high) = TESTED["vllm"]
        raise RuntimeError(f"fcpass's vLLM plugin needs vllm.config.VllmConfig, which vLLM {low[0]}.{low[1]} to "
                           f"{high[0]}.{high[1]} have; this vLLM {vllm.__version__} has none: {exc}") from exc
    return VllmConfig


_ABSENT = object()


def _take_fcpass_entry(vllm_config):
    """``additional_config['fcpass']``, taken out of the config (a copy without it replaces the user's dict), or
    ``_ABSENT``. vllm-ascend 0.30 validates additional_config with unknown keys forbidden, in the platform
    check vLLM's own ``__post_init__`` runs: with the entry still there, it refuses to start. The installed
    pass carries the entry's config from then on (and vLLM's compile-cache hash with it). What counts as an
    entry is what ``install_from_additional_config`` reads."""
    from collections.abc import Mapping

    from fcpass.vllm.compilation import ADDITIONAL_CONFIG_KEY

    additional = getattr(vllm_config, "additional_config", None)
    if not isinstance(additional, Mapping) or ADDITIONAL_CONFIG_KEY not in additional:
        return _ABSENT
    vllm_config.additional_config = {key: value for key, value in additional.items() if key != ADDITIONAL_CONFIG_KEY}
    return additional[ADDITIONAL_CONFIG_KEY]


def _show_in_vllms_output() -> None:
    """fcpass's log lines (the install line, each graph's one-line summary, the line of a process running fcpass's
    ops) in vLLM's own output, in every process vLLM starts.

    vLLM configures only its "vllm" logger (its handler, format and VLLM_LOGGING_LEVEL) and stops it there, in
    some processes only after plugins load; "fcpass" would fall through to Python's last-resort handler, which
    shows warnings only. A handler on "fcpass" hands each record to vLLM's handlers as they are when it is
    logged; the records still propagate (a pytest or an application's root handler sees them too)."""
    ours = logging.getLogger("fcpass")
    if not any(isinstance(handler, _ToVllmsHandlers) for handler in ours.handlers):
        ours.addHandler(_ToVllmsHandlers())
    if ours.level == logging.NOTSET:  # vLLM's level, from its setting (its logger may not be configured yet)
        ours.setLevel(os.environ.get("VLLM_LOGGING_LEVEL", "INFO").upper())


class _ToVllmsHandlers(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        propagated = logging.getLogger().handlers  # the record reaches the root's handlers anyway
        for handler in logging.getLogger("vllm").handlers:
            if handler not in propagated and record.levelno >= handler.level:
                handler.handle(record)


def _install_on_new_configs() -> None:
    VllmConfig = _vllm_config_class()
    original = VllmConfig.__post_init__
    if _installed_here():  # vLLM may load plugins more than once per process
        return

    @functools.wraps(original)
    def post_init_then_install_fcpass(self) -> None:
        entry = _take_fcpass_entry(self)
        original(self)
        from fcpass.vllm.compilation import check_installed_pass, install_entry

        if entry is not _ABSENT:
            install_entry(self, entry)
        check_installed_pass(self)  # installed either way: from additional_config or compilation_config

    setattr(post_init_then_install_fcpass, _WRAPPED_MARK, True)
    VllmConfig.__post_init__ = post_init_then_install_fcpass
    logger.debug("fcpass: VllmConfig installs FlashCommPass from additional_config['fcpass']")
