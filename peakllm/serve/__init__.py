"""`peakllm serve`: an OpenAI-compatible HTTP server over a paged KV cache with continuous batching.

One idea per file, data structure first (nano-vllm's layout):
`sequence.py` (a request's tokens and state), `block_manager.py` (the KV pool's free list and block
tables), `scheduler.py` (who runs this step: decode first, then chunked prefill, preemption by
recompute), `runner.py` (one forward over every scheduled token through the model's own modules, paged
attention), `engine.py` (the background thread that loops schedule → run → sample), `metrics.py`,
`api.py` (FastAPI routes, SSE streaming, OpenAI-shaped errors).
"""
