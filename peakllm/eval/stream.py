"""Perplexity of a model bigger than memory: the evaluation windows go through one decoder layer at a time.

The windows' hidden states (tokens x hidden floats) stay in memory while each layer is read from disk,
applied to every window with the keyword arguments the model itself builds (captured, as calibration
does), and dropped; then the final norm and lm_head give the NLL. Same windows, same calls, same numbers
as `perplexity()` on the model loaded whole.
"""

from __future__ import annotations

import time

import torch

from peakllm.calibrate.stats import capture_inputs
from peakllm.data import eval_windows, protocol_bos, tokenize_source
from peakllm.errors import PeakError
from peakllm.eval import window_nll
from peakllm.models.anatomy import base_model, layer_output
from peakllm.models.stream import StreamedModel
from peakllm.progress import tqdm


@torch.inference_mode()
def head_nll(model, hidden: list, windows: torch.Tensor) -> float:
    """Summed NLL of the windows from their last hidden states: final norm, lm_head, as the model does."""
    norm = getattr(base_model(model), "norm", None)
    if norm is None or getattr(model.config, "final_logit_softcapping", None):
        raise PeakError(f"streaming evaluation does not know the output head of {type(model).__name__}")
    total = 0.0
    for w, h in enumerate(hidden):
        logits = model.get_output_embeddings()(norm(h))
        total += float(window_nll(logits, windows[w:w + 1]))
    return total


def ppl_of(total_nll: float, windows: torch.Tensor) -> float:
    import math

    mean = total_nll / (windows.shape[0] * (windows.shape[1] - 1))
    return math.exp(mean) if mean < 700 else float("inf")


def stream_evaluate(spec: str, dataset: str = "wiki", *, seqlen: int = 512, max_tokens: int | None = 16384,
                    progress: bool = True, bos: bool = True) -> dict:

    sm = StreamedModel.open(spec)
    bos_id = protocol_bos(sm.tokenizer, bos)
    windows = eval_windows(tokenize_source(sm.tokenizer, dataset), seqlen, max_tokens, bos_id=bos_id)
    start = time.perf_counter()
    sm.load_outer("input")
    acts, kwargs = capture_inputs(sm.model, windows, 1, None)
    hidden = [acts[w] for w in range(len(acts))]
    sm.release_outer()
    with torch.inference_mode():
        for li in tqdm(range(len(sm.layers)), desc="perplexity (streamed)", unit="layer", disable=not progress):
            layer = sm.load_layer(li)
            hidden = [layer_output(layer(h, **kwargs[w][li])) for w, h in enumerate(hidden)]
            sm.release_layer(li)
    sm.load_outer("all")
    total = head_nll(sm.model, hidden, windows)
    seconds = time.perf_counter() - start
    mean = total / (windows.shape[0] * (windows.shape[1] - 1))
    return {"ppl": ppl_of(total, windows), "nll": mean, "tokens": windows.numel(), "seqlen": windows.shape[1],
            "seconds": seconds, "tokens_per_second": windows.numel() / seconds, "dataset": dataset, "streamed": True,
            "bos": bos_id is not None}
