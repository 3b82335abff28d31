"""What /metrics reports, in the Prometheus text format (no client library: a few lines suffice)."""

from __future__ import annotations

import threading
import time
from collections import deque

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RATE_WINDOW_S = 10.0


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.ttft_counts = [0] * (len(TTFT_BUCKETS) + 1)
        self.ttft_sum = 0.0
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.finished: dict[str, int] = {}
        self.steps = 0
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of the last steps

    def observe_ttft(self, seconds: float) -> None:
        with self.lock:
            i = next((i for i, b in enumerate(TTFT_BUCKETS) if seconds <= b), len(TTFT_BUCKETS))
            self.ttft_counts[i] += 1
            self.ttft_sum += seconds

    def observe_step(self, new_tokens: int, prompt_tokens: int) -> None:
        now = time.perf_counter()
        with self.lock:
            self.steps += 1
            self.generated_tokens += new_tokens
            self.prompt_tokens += prompt_tokens
            self._recent.append((now, new_tokens))
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()

    def observe_finish(self, reason: str) -> None:
        with self.lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1

    def tokens_per_second(self) -> float:
        now = time.perf_counter()
        with self.lock:
            return sum(n for t, n in self._recent if t >= now - RATE_WINDOW_S) / RATE_WINDOW_S

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        """Prometheus exposition text; `gauges` maps name -> (help, value) for the engine's live state."""
        lines = []

        def metric(name, kind, help_, samples):
            lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}"])
            lines.extend(f"{name}{labels} {value}" for labels, value in samples)

        for name, (help_, value) in gauges.items():  # the engine's live state; its *_total ones only grow
            metric(name, "counter" if name.endswith("_total") else "gauge", help_, [("", value)])
        metric("peakllm_generation_tokens_per_second", "gauge", f"generated tokens per second over the last "
               f"{RATE_WINDOW_S:g} s", [("", self.tokens_per_second())])
        with self.lock:
            metric("peakllm_generation_tokens_total", "counter", "tokens generated", [("", self.generated_tokens)])
            metric("peakllm_prompt_tokens_total", "counter", "prompt tokens prefilled (recomputed ones too)",
                   [("", self.prompt_tokens)])
            metric("peakllm_engine_steps_total", "counter", "engine steps run", [("", self.steps)])
            metric("peakllm_requests_finished_total", "counter", "requests finished, by reason",
                   [(f'{{reason="{r}"}}', n) for r, n in sorted(self.finished.items())])
            cumulative, samples = 0, []
            for bound, count in zip((*map(str, TTFT_BUCKETS), "+Inf"), self.ttft_counts):
                cumulative += count
                samples.append((f'_bucket{{le="{bound}"}}', cumulative))
            samples += [("_sum", self.ttft_sum), ("_count", cumulative)]
            metric("peakllm_time_to_first_token_seconds", "histogram", "time from arrival to the first token",
                   samples)
        return "\n".join(lines) + "\n"
