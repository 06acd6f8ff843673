"""A bounded serving load on a running ``vllm serve``: streamed completions, at most N in flight at once.

Each request is a prompt of token ids (the server has no tokenizer) and a
``max_tokens``, greedy with ``ignore_eos``, streamed through the ``openai``
client; ``concurrency`` threads take the requests in order, so exactly that
many are in flight until the queue runs dry. Per request: time to first
token (TTFT) and the gaps between later tokens (inter-token latency, ITL);
a chunk carrying k tokens counts as k tokens, its gap split evenly.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

REQUEST_TIMEOUT_S = 300


def percentile(values, q: float) -> float:
    """The ``q``-th percentile (0..100), linear between the two nearest ranks."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def stream_one(client, model: str, prompt: list[int], max_tokens: int) -> dict:
    """One streamed completion: {"ttft_s", "gaps_s" (one per token after the first), "tokens"}."""
    start = time.perf_counter()
    last, ttft, gaps = start, None, []
    stream = client.completions.create(model=model, prompt=[prompt], max_tokens=max_tokens, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True, "return_token_ids": True})
    for chunk in stream:
        now = time.perf_counter()
        count = sum(_chunk_tokens(choice) for choice in chunk.choices)
        if not count:
            continue
        if ttft is None:
            ttft, count = now - start, count - 1
            gaps += [0.0] * count  # arrived with the first token
        else:
            gaps += [(now - last) / count] * count
        last = now
    return {"ttft_s": ttft, "gaps_s": gaps, "tokens": (ttft is not None) + len(gaps)}


def _chunk_tokens(choice) -> int:
    """Tokens a streamed choice carries: its token ids (``return_token_ids``), else one per non-final chunk."""
    ids = (choice.model_extra or {}).get("token_ids")
    return len(ids) if ids is not None else int(choice.finish_reason is None)


def run_load(base_url: str, model: str, requests: list[tuple[list[int], int]], concurrency: int) -> dict:
    """Every request of ``requests`` [(prompt ids, max_tokens)], ``concurrency`` at a time; the raw records."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="unused", timeout=REQUEST_TIMEOUT_S, max_retries=0)
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        records = list(pool.map(lambda r: stream_one(client, model, *r), requests))
    return {"wall_s": time.perf_counter() - start, "records": records, "concurrency": concurrency}


def summary(load: dict) -> dict:
    """Throughput (generated tokens/s over the whole load), TTFT and ITL p50/p90/p99 in ms."""
    records = load["records"]
    gaps = [gap for r in records for gap in r["gaps_s"]]
    tokens = sum(r["tokens"] for r in records)
    return {"throughput_tok_s": tokens / load["wall_s"], "requests": len(records), "tokens": tokens,
            "wall_s": load["wall_s"], "concurrency": load["concurrency"],
            "ttft_ms": {f"p{q}": 1000 * percentile([r["ttft_s"] for r in records], q) for q in (50, 90, 99)},
            "itl_ms": {f"p{q}": 1000 * percentile(gaps, q) for q in (50, 90, 99)}}
