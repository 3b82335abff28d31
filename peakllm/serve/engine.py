"""The engine: one background thread that loops schedule → run → sample, and a thread-safe front door.

Callers (the HTTP side) `submit` a prompt with a callback and get the sequence's id; the callback is
called from the engine thread with ("token", id), then ("done", finish_reason) or ("error", message).
`cancel` frees a sequence's blocks at the next token boundary. All torch work happens in the thread.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from typing import Callable

import torch

from peakllm.errors import PeakError
from peakllm.runtime.sampling import eos_ids, sample
from peakllm.serve.block_manager import BlockManager
from peakllm.serve.logits import choose, needs_processing
from peakllm.serve.metrics import Metrics
from peakllm.serve.runner import PagedRunner
from peakllm.serve.scheduler import Scheduler, Work
from peakllm.serve.sequence import SamplingParams, Sequence


class QueueFull(PeakError):
    """The waiting queue holds --max-queue requests already (HTTP 429)."""


class Engine:
    def __init__(self, model, tokenizer, *, num_blocks: int = 256, block_size: int = 16, max_batch: int = 8,
                 max_step_tokens: int = 64, max_queue: int = 64, max_model_len: int | None = None,
                 threads: int | None = None, prefix_sharing: bool = True, max_memory: int | None = None,
                 whole_process: bool = False):
        if min(num_blocks, block_size, max_batch, max_step_tokens, max_queue) < 1:
            raise PeakError("--kv-blocks, --block-size, --max-batch, --max-step-tokens and --max-queue must be >= 1")
        self.runner = PagedRunner(model, num_blocks, block_size, max_memory, whole_process=whole_process,
                                  step_tokens=max(max_step_tokens, max_batch))
        self.blocks = BlockManager(num_blocks, block_size, prefix_sharing)
        self.scheduler = Scheduler(self.blocks, max_batch, max_step_tokens)
        # the context: the model's (RoPE table, sliding window), the caller's, and what the pool can hold
        self.max_model_len = min(max_model_len or model.max_seq, model.cos.shape[0], num_blocks * block_size)
        self.max_queue, self.threads = max_queue, threads
        self.eos = eos_ids(model, tokenizer)
        self.metrics = Metrics()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._queued = 0  # submitted, not yet taken in by the engine thread
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._live: dict[int, Sequence] = {}
        self._thread = threading.Thread(target=self._loop, name="peakllm-engine", daemon=True)

    def warmup(self) -> None:
        """One prefill and one decode step on a throwaway sequence, so that the kernels are built (or
        loaded) and the pool's pages touched before the first request; call before start()."""
        seq = Sequence([0, 0], SamplingParams(max_tokens=1), lambda *_: None)
        self.blocks.grow(seq, 2)
        self.runner.forward([Work(seq, 0, 1)])
        self.runner.forward([Work(seq, 1, 1)])
        self.blocks.release(seq)

    def start(self) -> "Engine":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()

    # ---- front door (any thread) ----
    def check_request(self, num_prompt: int, max_tokens: int) -> None:
        """Refuse what could never run: raises PeakError (HTTP 400)."""
        if num_prompt < 1:
            raise PeakError("the prompt is empty")
        if num_prompt + max_tokens > self.max_model_len:  # also what keeps a request within the KV pool
            raise PeakError(f"the prompt ({num_prompt} tokens) plus max_tokens ({max_tokens}) exceeds this server's "
                            f"context of {self.max_model_len} tokens")

    def submit(self, prompt: list[int], params: SamplingParams, emit: Callable[[str, object], None]) -> int:
        self.check_request(len(prompt), params.max_tokens)
        with self._lock:
            if self._queued + len(self.scheduler.waiting) >= self.max_queue:
                raise QueueFull(f"the server's queue is full ({self.max_queue} requests waiting); retry later")
            self._queued += 1
        seq = Sequence(list(prompt), params, emit)
        self._inbox.put(("add", seq))
        self._wake.set()
        return seq.seq_id

    def cancel(self, seq_id: int) -> None:
        self._inbox.put(("cancel", seq_id))
        self._wake.set()

    def gauges(self) -> dict[str, tuple[str, float]]:
        return {
            "peakllm_requests_waiting": ("requests queued, not yet running", self._queued + len(self.scheduler.waiting)),
            "peakllm_requests_running": ("sequences in the running batch", len(self.scheduler.running)),
            "peakllm_kv_blocks_used": ("KV cache blocks in use", self.blocks.num_used),
            "peakllm_kv_blocks_total": ("KV cache blocks in the pool", self.blocks.num_blocks),
            "peakllm_preemptions_total": ("sequences preempted (recomputed later)", self.scheduler.preemptions),
            "peakllm_prefix_reused_tokens_total": ("prompt tokens whose K/V came from shared blocks",
                                                   self.blocks.reused_tokens),
        }

    # ---- engine thread ----
    def _loop(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        while not self._stop:
            self._drain()
            if not self.scheduler.has_work():
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                self.step()
            except Exception:  # noqa: BLE001 - a bug outside the forward: fail what is live, keep the thread
                traceback.print_exc()
                for seq in list(self._live.values()):
                    self._finish(seq, None, error="internal error in the engine (see the server's log)")
        for seq in list(self._live.values()):
            self._finish(seq, None, error="the server is shutting down")

    def _drain(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                with self._lock:
                    self._queued -= 1
                self._live[item.seq_id] = item
                self.scheduler.add(item)
            elif item in self._live:  # cancel; a finished sequence is already gone
                self._finish(self._live[item], "cancelled", quiet=True)

    def step(self) -> None:
        work = self.scheduler.schedule()
        if not work:
            return
        try:
            logits = self.runner.forward(work)
        except Exception as exc:  # noqa: BLE001 - fail the requests that fail, keep serving the others
            work, logits = self._retry_alone(work, exc)
            if not work:
                return
        sampled = [w for w in work if w.sample]
        tokens = self._sample(sampled, logits)
        now = time.perf_counter()
        for w in work:
            w.seq.num_computed = w.start + w.n
            self.blocks.register(w.seq)
        decodes = sum(1 for w in work if w.n == 1 and w.start >= len(w.seq.prompt))
        self.metrics.observe_step(len(sampled), sum(w.n for w in work) - decodes)
        for w, token in zip(sampled, tokens):
            seq = w.seq
            seq.tokens.append(token)
            if seq.first_token_at is None:
                seq.first_token_at = now
                self.metrics.observe_ttft(now - seq.arrival)
            seq.emit("token", token)
            if seq.params.stop_at_eos and token in self.eos:
                self._finish(seq, "stop")
            elif seq.num_generated >= seq.params.max_tokens or len(seq.tokens) >= self.max_model_len:
                self._finish(seq, "length")

    def _retry_alone(self, work: list[Work], exc: Exception) -> tuple[list[Work], torch.Tensor | None]:
        """The step's forward raised: run each of its sequences alone, so that only those whose own pass
        fails get the error and the others of the batch go on. Safe to redo: a pass writes K/V only at
        the slots of the tokens it computes, and the pass that computes them again rewrites them."""
        if len(work) == 1:
            self._finish(work[0].seq, None, error=f"{type(exc).__name__}: {exc}")
            return [], None
        kept, rows = [], []
        for w in work:
            try:
                rows.append(self.runner.forward([w]))  # [1, vocab] if it samples, else [0, vocab]
            except Exception as alone:  # noqa: BLE001 - this request's own failure
                self._finish(w.seq, None, error=f"{type(alone).__name__}: {alone}")
            else:
                kept.append(w)
        return kept, (torch.cat(rows) if rows else None)

    def _sample(self, sampled: list[Work], logits: torch.Tensor) -> list[int]:
        greedy = logits.argmax(dim=-1).tolist()
        out = []
        for i, w in enumerate(sampled):
            p = w.seq.params
            if needs_processing(p):  # penalties, top-k, logprobs: one row at a time
                token, logprobs = choose(logits[i], p, w.seq.tokens[len(w.seq.prompt):], w.seq.generator)
                out.append(token)
                if logprobs is not None:
                    w.seq.emit("logprobs", logprobs)  # before its ("token", id)
            elif p.temperature > 0:
                out.append(int(sample(logits[i:i + 1], p.temperature, p.top_p, w.seq.generator)[0]))
            else:
                out.append(greedy[i])
        return out

    def _finish(self, seq: Sequence, reason: str | None, *, error: str | None = None, quiet: bool = False) -> None:
        self.scheduler.remove(seq)
        self._live.pop(seq.seq_id, None)
        seq.finished = True
        self.metrics.observe_finish(reason or "error")
        if quiet:
            return
        seq.emit("error", error) if error is not None else seq.emit("done", reason)
