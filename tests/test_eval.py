import math

import pytest
import torch

from peakllm.data import eval_windows
from peakllm.errors import PeakError
from peakllm.eval import perplexity


def hand_perplexity(model, tokens, seqlen):
    """The protocol written out: windows, per-token log-probabilities, exp of the mean NLL."""
    nlls = []
    n = tokens.numel() // seqlen
    for i in range(n):
        window = tokens[i * seqlen:(i + 1) * seqlen]
        with torch.no_grad():
            logits = model(input_ids=window[None]).logits[0].double()
        logprobs = torch.log_softmax(logits, dim=-1)
        for t in range(seqlen - 1):
            nlls.append(-float(logprobs[t, window[t + 1]]))
    return math.exp(sum(nlls) / len(nlls)), len(nlls)


def test_perplexity_matches_hand_computation(tiny_llama):
    torch.manual_seed(1)
    tokens = torch.randint(0, 300, (3 * 16 + 5,))  # remainder of 5 must be dropped
    expected, n_pred = hand_perplexity(tiny_llama, tokens, 16)
    for batch_size in (1, 2, 3):
        result = perplexity(tiny_llama, eval_windows(tokens, 16), batch_size=batch_size, progress=False)
        assert result["tokens"] == 48
        assert math.isclose(result["ppl"], expected, rel_tol=1e-5)
    assert n_pred == 3 * 15


def test_token_budget_keeps_first_windows():
    tokens = torch.arange(100)
    w = eval_windows(tokens, 10, max_tokens=35)
    assert w.shape == (3, 10)
    assert torch.equal(w[0], torch.arange(10)) and torch.equal(w[2], torch.arange(20, 30))
    assert eval_windows(tokens, 10).shape == (10, 10)
    assert eval_windows(torch.arange(25), 10).shape == (2, 10)


@pytest.mark.parametrize("tokens,seqlen,budget", [(torch.arange(5), 10, None), (torch.arange(100), 10, 5),
                                                  (torch.arange(100), 1, None)])
def test_window_errors(tokens, seqlen, budget):
    with pytest.raises(PeakError):
        eval_windows(tokens, seqlen, budget)


def test_bf16_close_to_fp32(tiny_llama):
    torch.manual_seed(2)
    windows = eval_windows(torch.randint(0, 300, (64,)), 32)
    fp32 = perplexity(tiny_llama, windows, progress=False)["ppl"]
    bf16 = perplexity(tiny_llama.to(torch.bfloat16), windows, progress=False)["ppl"]
    assert abs(bf16 / fp32 - 1) < 0.02
