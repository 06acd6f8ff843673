"""``make captures``: the TP=8 capture of the committed test data (tests/data/captures/vllm_llama_tp8).

Eight gloo ranks build vLLM's Llama of one layer (``llama_8_heads``: TP=8 splits its 8
heads) and compile it with Inductor and fcpass's showcase config, with
``FCPASS_CAPTURE`` set; the replay's results (``python -m fcpass.replay
--json``) become the expectation the committed-data test checks. The TP=2
engine and vllm-ascend captures come from the tests that capture them
(``FCPASS_UPDATE_CAPTURES=1``: tests/support/replays.py).
"""

from __future__ import annotations

import os
import pathlib
import shutil

from devtools.launch import run_ranks
from devtools.vllm_cpu import compile_and_run, rank_setup

DATA = pathlib.Path(__file__).resolve().parent.parent / "tests" / "data" / "captures"
SHOWCASE = {"threshold_tokens": 16, "sequence_parallel": True, "sequence_parallel_threshold_tokens": 1}


def capture_rank(rank: int, world_size: int, folder: str, fields: dict) -> None:
    import fcpass.vllm
    from passes.capture import CAPTURE_ENV

    os.environ[CAPTURE_ENV] = folder
    compile_and_run(rank, world_size, "llama_8_heads", token_counts=(64,), vllm_sp=False, run_compiled=False,
                    layers=1, compilation_config=fcpass.vllm.compilation_config(fields))


def main() -> None:
    from fcpass import replay

    target = DATA / "vllm_llama_tp8"
    shutil.rmtree(target, ignore_errors=True)
    run_ranks(capture_rank, 8, str(target), SHOWCASE, setup=rank_setup, timeout=1800)
    expected = DATA / "vllm_llama_tp8.expected.json"
    status = replay.main([str(target), "--json", str(expected)])
    if status:
        raise SystemExit(f"the TP=8 capture does not replay (exit {status})")


if __name__ == "__main__":
    main()
