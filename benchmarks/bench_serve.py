"""Load test of `peakllm serve`: N concurrent streaming clients on loopback, bounded in requests and time.

  python benchmarks/bench_serve.py [--model default] [--concurrency 1,2,4,8] [--requests-per-client 2]
                                   [--max-tokens 64] [--max-seconds 300] [--threads 2] [--json out.json]

Starts `peakllm serve` on 127.0.0.1 (a free port) in its own process, then for each concurrency level
runs that many clients, each sending its requests one after another (streamed completions, greedy,
`ignore_eos` so every answer has exactly --max-tokens tokens). Reports per level: output tokens/s over
the level's wall time, time to first token p50/p99, inter-token latency p50/p99 (gaps between streamed
chunks), errors (failed requests, or an answer whose token count is not --max-tokens), and mismatches
(a prompt's greedy text differs from the first answer to the same prompt: a corrupted stream, or a
near tie flipped by a different batch composition). Stops the server at the end, whatever happened.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

PROMPTS = [
    "The history of the Roman Empire begins", "Photosynthesis is the process by which",
    "In computer science, a hash table is", "The best way to learn a new language is",
    "Once upon a time in a small village", "The theory of relativity states that",
    "Here is a recipe for a simple tomato soup:", "The main causes of the French Revolution were",
    "A good night's sleep is important because", "def quicksort(items):",
    "The planets of the solar system, in order, are", "Dear hiring manager, I am writing to apply",
    "The water cycle describes how", "Three tips for writing clear documentation:",
    "The capital of Australia is", "Machine learning models generalize when",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


async def _one(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    stamps, pieces, tokens = [], [], None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return {"error": event["error"]["message"]}
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                if choice["text"]:
                    stamps.append(time.perf_counter())
                    pieces.append(choice["text"])
    if tokens != max_tokens:
        return {"error": f"{tokens} tokens instead of {max_tokens}"}
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"prompt": prompt, "text": "".join(pieces), "tokens": tokens, "ttft": stamps[0] - start if stamps else None,
            "gaps": gaps}


async def _level(url: str, model: str, clients: int, per_client: int, max_tokens: int, deadline: float) -> list:
    results: list[dict] = []

    async def client_loop(i: int):
        async with httpx.AsyncClient(timeout=600, trust_env=False) as client:
            for k in range(per_client):
                if time.monotonic() > deadline:
                    return
                prompt = PROMPTS[(i * per_client + k) % len(PROMPTS)]
                try:
                    results.append(await _one(client, url, model, prompt, max_tokens))
                except httpx.HTTPError as exc:
                    results.append({"error": f"{type(exc).__name__}: {exc}"})

    await asyncio.gather(*(client_loop(i) for i in range(clients)))
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--concurrency", default="1,2,4,8", help="comma-separated client counts (default: %(default)s)")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-seconds", type=float, default=300, help="time budget per level; no new request after it")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--kv-blocks", type=int, default=256)
    ap.add_argument("--max-step-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    port = _free_port()
    cmd = [sys.executable, "-m", "peakllm", "serve", "--model", args.model, "--port", str(port), "--served-name", "m",
           "--max-batch", str(max(levels)), "--kv-blocks", str(args.kv_blocks), "--dtype", args.dtype,
           "--max-step-tokens", str(args.max_step_tokens), "--max-queue", str(4 * max(levels))]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    server = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1], env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    rows, first_text = [], {}
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            try:
                if httpx.get(f"{url}/health", trust_env=False).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        asyncio.run(_level(url, "m", 1, 1, 8, time.monotonic() + 60))  # warm-up: kernels built, pages touched
        for c in levels:
            start = time.perf_counter()
            results = asyncio.run(_level(url, "m", c, args.requests_per_client, args.max_tokens,
                                         time.monotonic() + args.max_seconds))
            wall = time.perf_counter() - start
            ok = [r for r in results if "error" not in r]
            mismatches = 0
            for r in ok:
                mismatches += first_text.setdefault(r["prompt"], r["text"]) != r["text"]
            gaps = [g for r in ok for g in r["gaps"]]
            ttfts = [r["ttft"] for r in ok if r["ttft"] is not None]
            rows.append({"concurrency": c, "requests": len(results), "errors": len(results) - len(ok),
                         "mismatches": mismatches, "tokens": sum(r["tokens"] for r in ok), "seconds": wall,
                         "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
                         "ttft_p50": _pct(ttfts, 0.5), "ttft_p99": _pct(ttfts, 0.99),
                         "itl_p50": _pct(gaps, 0.5), "itl_p99": _pct(gaps, 0.99),
                         "error_samples": [r["error"] for r in results if "error" in r][:3]})
            r = rows[-1]
            print(f"c={c}: {r['tokens_per_s']:.1f} tok/s, TTFT p50 {r['ttft_p50']:.3f} s, ITL p50 "
                  f"{r['itl_p50'] * 1000:.0f} ms, errors {r['errors']}, mismatches {r['mismatches']}", file=sys.stderr)
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    base = rows[0]["tokens_per_s"] if rows else float("nan")
    print(f"\nmodel {args.model} ({args.dtype}), {args.max_tokens} tokens per answer, load average "
          f"{os.getloadavg()[0]:.2f} at the end\n")
    print("| streams | requests | tok/s | × 1 stream | TTFT p50 s | TTFT p99 s | ITL p50 ms | ITL p99 ms | errors | mismatches |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['requests']} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base:.2f} | "
              f"{r['ttft_p50']:.3f} | {r['ttft_p99']:.3f} | {r['itl_p50'] * 1000:.0f} | {r['itl_p99'] * 1000:.0f} | "
              f"{r['errors']} | {r['mismatches']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "levels": rows}, indent=1))
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
