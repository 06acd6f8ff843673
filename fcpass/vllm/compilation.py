"""vLLM integration: put FlashCommPass where vLLM runs its post-grad passes.

vLLM runs one user pass, found in ``compilation_config.inductor_compile_config``
under the platform's pass key: ``post_grad_custom_post_pass`` (CUDA, CPU, ...;
vLLM's PostGradPassManager adds it after its own passes, so after
SequenceParallelismPass on vLLM <= 0.31) or, on vllm-ascend,
``graph_fusion_manager`` (added to its GraphFusionPassManager). Where vLLM's
manager does not run (CPU compiles with plain Inductor) Inductor runs the
pass itself from the same key.

fcpass fuses the collectives that vLLM's AsyncTPPass would: with fcpass on,
AsyncTPPass (``fuse_gemm_comms``) is switched off and sequence parallelism
(``enable_sp``) kept, so the two never compete for the same sites. With
fcpass's own sequence parallelism (``PassConfig.sequence_parallel``) vLLM's
must be off (vLLM <= 0.31; later releases have none), and its threshold
becomes a compile range endpoint, so vLLM compiles a graph for the token
counts above it, where the split applies, apart from the one below it.

vLLM is imported lazily: this module imports on machines without it (``fcpass.vllm``
imports it, and the runtime reads ``fcpass.vllm.state``).
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Mapping

from fcpass.config import PassConfig

logger = logging.getLogger(__name__)

POST_GRAD_PASS_KEY = "post_grad_custom_post_pass"
ASCEND_PASS_KEY = "graph_fusion_manager"  # vllm-ascend's platform pass_key
ADDITIONAL_CONFIG_KEY = "fcpass"  # --additional-config '{"fcpass": {...PassConfig fields...}}'


def compilation_config(pass_config: PassConfig | Mapping[str, Any] | None = None, base=None):
    """A vLLM compilation config with FlashCommPass installed, for ``vllm.LLM(compilation_config=...)``.

    ``base``: None, a dict, or a vLLM ``CompilationConfig``; it is copied, not
    changed. Returns the same kind (a dict for None). ``pass_config`` may be a
    ``fcpass.PassConfig`` or a dict of its fields.
    """
    flashcomm = make_pass(pass_config)
    sp_threshold = _sp_threshold(flashcomm.config)
    if base is None or isinstance(base, Mapping):
        config = copy.deepcopy(dict(base or {}))
        config["inductor_compile_config"] = dict(config.get("inductor_compile_config") or {})
        if config.get("pass_config") is not None:
            config["pass_config"] = _instead_of_async_tp(config["pass_config"], flashcomm.config)
        if sp_threshold is not None:
            config["compile_ranges_endpoints"] = _with_endpoint(config.get("compile_ranges_endpoints"), sp_threshold)
        _install(config["inductor_compile_config"], flashcomm)
        return config
    config = copy.deepcopy(base)
    _instead_of_async_tp(config.pass_config, flashcomm.config)
    if sp_threshold is not None:
        config.compile_ranges_endpoints = _with_endpoint(config.compile_ranges_endpoints, sp_threshold)
    _install(config.inductor_compile_config, flashcomm)
    return config


def install_from_additional_config(vllm_config) -> bool:
    """Install the pass into ``vllm_config`` if its additional_config has an "fcpass" entry; True if it did.

    Raises ValueError naming the bad field for invalid settings, so a wrong
    ``--additional-config`` fails at startup, not at the first compilation.
    """
    additional = getattr(vllm_config, "additional_config", None)
    if not isinstance(additional, Mapping) or ADDITIONAL_CONFIG_KEY not in additional:
        return False
    install_entry(vllm_config, additional[ADDITIONAL_CONFIG_KEY])
    return True


def install_entry(vllm_config, entry) -> None:
    """Install the pass an ``additional_config['fcpass']`` entry asks for into ``vllm_config`` (ValueError naming
    the bad field)."""
    try:
        flashcomm = make_pass(entry)
    except ValueError as exc:
        raise ValueError(f"additional_config[{ADDITIONAL_CONFIG_KEY!r}]: {exc}") from None
    compilation = vllm_config.compilation_config
    try:
        _instead_of_async_tp(compilation.pass_config, flashcomm.config)
    except ValueError as exc:
        raise ValueError(f"additional_config[{ADDITIONAL_CONFIG_KEY!r}]: {exc}") from None
    sp_threshold = _sp_threshold(flashcomm.config)
    max_tokens = getattr(getattr(vllm_config, "scheduler_config", None), "max_num_batched_tokens", None)
    if sp_threshold is not None and compilation.compile_ranges_endpoints is not None and (
            max_tokens is None or sp_threshold < max_tokens):
        # vLLM has already computed its ranges (this runs after VllmConfig.__post_init__): add the
        # endpoint as its _set_compile_ranges would have.
        compilation.compile_ranges_endpoints = _with_endpoint(compilation.compile_ranges_endpoints, sp_threshold)
    _install(compilation.inductor_compile_config, flashcomm)


def passes_do_not_run(vllm_config) -> str | None:
    """Why vLLM's platform will not run the FlashCommPass installed in ``vllm_config``, or None.

    vllm-ascend compiles the full graph modes (cudagraph_mode FULL, FULL_DECODE_ONLY) with npugraph_ex when
    ``ascend_compilation_config.enable_npugraph_ex`` is on (its default; it switches it off itself for NONE and
    the piecewise modes), and npugraph_ex never calls its GraphFusionPassManager: no user pass runs at all.
    """
    compilation = vllm_config.compilation_config
    if not _is_flashcomm((compilation.inductor_compile_config or {}).get(ASCEND_PASS_KEY)):
        return None
    ascend = (getattr(vllm_config, "additional_config", None) or {}).get("ascend_compilation_config") or {}
    mode = compilation.cudagraph_mode
    if not ascend.get("enable_npugraph_ex", True) or mode is None or not mode.has_full_cudagraphs() \
            or mode.requires_piecewise_compilation():
        return None
    return (f"vllm-ascend compiles cudagraph_mode {mode.name} with npugraph_ex, which runs no user pass: fcpass "
            "would do nothing. Set additional_config['ascend_compilation_config']['enable_npugraph_ex'] to false "
            "(or use a piecewise cudagraph_mode) for fcpass to run")


def competing_vllm_pass(vllm_config) -> str | None:
    """Why the FlashCommPass installed in ``vllm_config`` cannot do what its config asks, given vLLM's own
    passes, or None. vLLM's ``pass_config.fuse_allreduce_rms`` (on by default with TP > 1 on Hopper and
    Blackwell) rewrites every all_reduce + RMSNorm into its fused op before user passes run, so fcpass's
    sequence parallelism would find nothing to split."""
    installed = (vllm_config.compilation_config.inductor_compile_config or {}).get(pass_key())
    pass_config = getattr(vllm_config.compilation_config, "pass_config", None)
    if not _is_flashcomm(installed) or not installed.config.sequence_parallel \
            or not getattr(pass_config, "fuse_allreduce_rms", False):
        return None
    return ("fcpass's sequence_parallel and vLLM's pass_config.fuse_allreduce_rms both take the all_reduce + "
            "RMSNorm sites, and vLLM's pass runs first (the split would find nothing): set "
            "compilation_config pass_config fuse_allreduce_rms=False to split them, or fcpass "
            "sequence_parallel=False to keep vLLM's fusion")


def check_installed_pass(vllm_config) -> None:
    """At startup, where vLLM builds its config: a competing vLLM pass is an error naming both settings; a
    platform that will not run the pass is a warning (a user who turned fcpass on must not get a silent no-op)."""
    conflict = competing_vllm_pass(vllm_config)
    if conflict:
        raise ValueError(f"fcpass: {conflict}")
    reason = passes_do_not_run(vllm_config)
    if reason:
        logger.warning("fcpass: %s", reason)


def make_pass(pass_config: PassConfig | Mapping[str, Any] | None = None):
    """FlashCommPass as vLLM takes it, for ``pass_config`` (a PassConfig, a dict of its fields, or None for the
    defaults)."""
    from fcpass.vllm.inductor_pass import VllmFlashCommPass  # lazily: vLLM, and Inductor's pattern matcher

    if pass_config is None or isinstance(pass_config, Mapping):
        pass_config = PassConfig.from_dict(pass_config or {})
    if not isinstance(pass_config, PassConfig):
        raise TypeError(f"pass_config must be a fcpass.PassConfig or a dict, got {type(pass_config).__name__}")
    return VllmFlashCommPass(pass_config)


def pass_key() -> str:
    """The inductor_compile_config key vLLM's compilation backend reads user passes from on this platform."""
    try:
        from vllm.platforms import current_platform

        return current_platform.pass_key
    except (ImportError, AttributeError):  # no vLLM, or one without platform pass keys
        return POST_GRAD_PASS_KEY


def _install(inductor_compile_config: dict, flashcomm) -> None:
    key = pass_key()
    current = inductor_compile_config.get(key)
    if current is not None and not _is_flashcomm(current):
        raise ValueError(
            f"inductor_compile_config[{key!r}] already holds {current!r}; vLLM runs one user pass there, "
            "so fcpass cannot be installed beside it"
        )
    if _is_flashcomm(current) and current.config != flashcomm.config:
        raise ValueError(f"fcpass is configured twice, differently: {current.config} and {flashcomm.config}")
    inductor_compile_config[key] = flashcomm
    logger.info("fcpass: FlashCommPass installed under inductor_compile_config[%r] with %s", key, flashcomm.config)


def _is_flashcomm(value) -> bool:
    from passes import FlashCommPass

    return isinstance(value, FlashCommPass)


def _instead_of_async_tp(pass_config, fcpass_config: PassConfig):
    """vLLM's pass_config (dict or PassConfig) with AsyncTPPass off, and vLLM's SP on if AsyncTP had asked
    for it, unless fcpass does SP itself; vLLM's SP and fcpass's together is an error."""
    get = pass_config.get if isinstance(pass_config, Mapping) else lambda name: getattr(pass_config, name, None)
    if fcpass_config.sequence_parallel and get("enable_sp"):
        raise ValueError("sequence_parallel: fcpass's and vLLM's sequence parallelism (pass_config.enable_sp) "
                         "would both split the all_reduces; turn one off")
    if not get("fuse_gemm_comms"):
        return pass_config
    if not _vllm_has_async_tp():
        return _without_async_tp_field(pass_config, fcpass_config)
    vllm_sp = not fcpass_config.sequence_parallel
    logger.info("fcpass: vLLM's fuse_gemm_comms (AsyncTPPass) off%s; fcpass fuses those sites",
                ", enable_sp on" if vllm_sp else "")
    if isinstance(pass_config, Mapping):
        return {**pass_config, "fuse_gemm_comms": False, **({"enable_sp": True} if vllm_sp else {})}
    pass_config.fuse_gemm_comms = False
    if vllm_sp:
        pass_config.enable_sp = True
    return pass_config


def _vllm_has_async_tp() -> bool:
    """vLLM <= 0.31 has AsyncTPPass and sequence parallelism, and their pass_config fields; 0.32 removed both."""
    import dataclasses

    from vllm.config import PassConfig as VllmPassConfig

    return "fuse_gemm_comms" in {f.name for f in dataclasses.fields(VllmPassConfig)}


def _without_async_tp_field(pass_config: Mapping, fcpass_config: PassConfig) -> dict:
    """vLLM >= 0.32: ``fuse_gemm_comms`` (the user's field) is not vLLM's any more; fcpass fuses those sites
    where its own sequence parallelism makes them, so it takes the field's place or says what to set."""
    if not fcpass_config.sequence_parallel:
        raise ValueError(
            "pass_config.fuse_gemm_comms: this vLLM (>= 0.32) has no AsyncTPPass and no sequence parallelism; "
            "fcpass fuses those sites after its own split: drop fuse_gemm_comms and set "
            "fcpass.PassConfig(sequence_parallel=True)")
    logger.info("fcpass: pass_config.fuse_gemm_comms dropped (not a field of this vLLM); fcpass's sequence "
                "parallelism and fusion take its place")
    return {name: value for name, value in pass_config.items() if name != "fuse_gemm_comms"}


def _sp_threshold(config: PassConfig) -> int | None:
    return config.sequence_parallel_threshold_tokens if config.sequence_parallel else None


def _with_endpoint(endpoints, threshold: int) -> list[int]:
    """Compile range endpoints plus ``threshold``: ranges [.., threshold] and [threshold + 1, ..] (vLLM ranges
    are inclusive), so one graph serves exactly the counts above the threshold."""
    return sorted(set(endpoints or []) | ({threshold} if threshold > 1 else set()))
