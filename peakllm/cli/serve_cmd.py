"""peakllm serve: an OpenAI-compatible HTTP server (paged KV cache, continuous batching)."""

from __future__ import annotations

import argparse

from peakllm.cli.common import (add_act_option, add_adapter_option, add_max_memory_run_option, add_model_option,
                                add_threads_option, apply_act, read_adapter_arg, set_threads, stderr)
from peakllm.errors import PeakError

EPILOG = """\
Endpoints: POST /v1/completions, POST /v1/chat/completions (the tokenizer's chat template), both with
"stream": true for server-sent events; GET /v1/models, /health, /metrics (Prometheus text).
Any OpenAI client works, e.g. OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused").
Request fields: temperature, top_p, top_k, seed, stop, max_tokens, n, presence_penalty, frequency_penalty,
logprobs (+ top_logprobs on chat), stream_options.include_usage; any other field that would change the
output gets HTTP 400 naming it.

Security: without --api-key (or PEAKLLM_API_KEY) anyone who can reach the port can use the server; binding
beyond loopback (--host 0.0.0.0) without a key opens it to the whole network. With a key every path but
/health needs "Authorization: Bearer KEY" (HTTP 401 otherwise).

How it runs: requests join and leave the running batch at token boundaries; each engine step sends every
running stream's next token plus a chunk of waiting prompts (at most --max-step-tokens tokens in all)
through one pass over the weights. The KV cache is --kv-blocks blocks of --block-size tokens, allocated
once at start; when it is full the newest stream is preempted and recomputed later (nothing is dropped).
Greedy (temperature 0) output is the same as `peakllm generate`'s."""


def register(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching",
                       description="Serve the model over HTTP in the OpenAI API shape (completions and chat, "
                       "streaming), batching concurrent requests through one pass over the weights.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_option(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s; 0.0.0.0 "
                   "exposes the server to the network: without --api-key it is open to anyone who reaches it)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every path but /health (default: the PEAKLLM_API_KEY "
                   "environment variable, else no key)")
    p.add_argument("--max-request-bytes", type=int, default=1 << 20,
                   help="largest request body; larger ones get HTTP 413 (default: %(default)s)")
    p.add_argument("--max-tokens-limit", type=int, default=None,
                   help="most tokens one completion may ask for (max_tokens); more get HTTP 400 (default: the context)")
    p.add_argument("--max-n", type=int, default=8, help="most choices (n) per request (default: %(default)s)")
    p.add_argument("--served-name", default=None, help="the model id clients send (default: the --model value)")
    p.add_argument("--max-batch", type=int, default=8, help="most sequences running at once (default: %(default)s)")
    p.add_argument("--kv-blocks", type=int, default=256, help="KV cache blocks (default: %(default)s)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default: %(default)s)")
    p.add_argument("--max-step-tokens", type=int, default=64,
                   help="tokens per engine step, decodes plus prompt chunks: smaller keeps streams smoother while "
                   "prompts arrive, larger prefills faster (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting beyond the running batch; more get HTTP 429 (default: %(default)s)")
    p.add_argument("--max-model-len", type=int, default=2048,
                   help="longest prompt + completion in tokens (capped by the model's own limit; default: %(default)s)")
    p.add_argument("--no-prefix-sharing", action="store_true",
                   help="do not reuse the KV blocks of identical prompt prefixes (a shared system prompt is computed "
                   "once and its full blocks are shared by default)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype of activations, dense weights and the KV cache (default: %(default)s)")
    add_act_option(p)
    add_adapter_option(p)
    add_max_memory_run_option(p)  # the KV pool (--kv-blocks) is part of the budget
    add_threads_option(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import os

    import torch
    import uvicorn

    from peakllm.serve.api import build_app
    from peakllm.serve.server import build_engine

    set_threads(args.threads)
    apply_act(args.act)
    if not 0 < args.port < 65536:
        raise PeakError(f"--port must be in 1..65535, got {args.port}")
    if args.max_model_len < 2:
        raise PeakError(f"--max-model-len must be >= 2, got {args.max_model_len}")
    if min(args.max_request_bytes, args.max_n, args.max_tokens_limit or 1) < 1:
        raise PeakError("--max-request-bytes, --max-n and --max-tokens-limit must be >= 1")
    api_key = args.api_key or os.environ.get("PEAKLLM_API_KEY") or None
    from peakllm import memory

    budget = memory.parse_size(args.max_memory) if args.max_memory else None
    adapter = read_adapter_arg(args)
    engine, tokenizer = build_engine(
        args.model, dtype=getattr(torch, args.dtype), max_model_len=args.max_model_len, num_blocks=args.kv_blocks,
        block_size=args.block_size, max_batch=args.max_batch, max_step_tokens=args.max_step_tokens,
        max_queue=args.max_queue, threads=args.threads, prefix_sharing=not args.no_prefix_sharing, max_memory=budget,
        whole_process=True, adapter=adapter)
    name = args.served_name or args.model
    kv_mb = engine.runner.kv_bytes / 2**20
    stderr(f"peakllm serve: '{name}' on http://{args.host}:{args.port}/v1 — KV cache {args.kv_blocks} blocks × "
           f"{args.block_size} tokens ({kv_mb:.0f} MB), batch ≤ {args.max_batch}, context {engine.max_model_len}")
    off = engine.runner.offload
    if off is not None:
        plan = off.describe()
        shown = ("all in memory" if plan["all_resident"] else
                 f"{plan['expert_capacity']} of {plan['experts']} experts cached" if "experts" in plan else
                 f"{plan['pinned_layers']} layers pinned, {plan['streamed_layers']} streamed from disk")
        stderr(f"peakllm serve: --max-memory {args.max_memory}: {shown}")
    if api_key is None and not is_loopback(args.host):
        stderr(f"peakllm serve: WARNING: listening on {args.host} without --api-key: anyone who can reach this port "
               "can use the server")
    engine.warmup()
    engine.start()
    app = build_app(engine, tokenizer, name, api_key=api_key, max_request_bytes=args.max_request_bytes,
                    max_tokens_limit=args.max_tokens_limit, max_n=args.max_n)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        engine.stop()
    return 0


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: it may resolve anywhere
        return False
