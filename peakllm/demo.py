"""`make demo`: the main job on the embedded default model, end to end, with measured numbers."""

from __future__ import annotations

import sys
import time

from peakllm.cli.common import format_table


def main() -> int:
    from peakllm.eval import evaluate
    from peakllm.models import load_model
    from peakllm.runtime.hf_loop import hf_generate_text

    print("peakllm demo: SmolLM2-135M-Instruct (the default model), on this machine's CPU\n", flush=True)
    start = time.perf_counter()
    model, tokenizer = load_model("default")
    print(f"loaded in {time.perf_counter() - start:.1f} s", flush=True)
    dense = evaluate(model, tokenizer, "wiki", seqlen=512, max_tokens=4096)
    prompt = "The capital of France is"
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    text, _ = hf_generate_text(model, tokenizer, ids, 24)
    print(f"\n{prompt}{text}\n")
    rows = {"model": "default (dense fp32)", "dataset": "wiki (held-out split)", "tokens": dense["tokens"],
            "seqlen": dense["seqlen"], "ppl": dense["ppl"], "eval tokens/s": dense["tokens_per_second"]}
    print(format_table("results", rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
