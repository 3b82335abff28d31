"""The GGUF writer: every tensor reads back bit-exactly through gguf's reader and dequantizer (q/k rows in
llama.cpp's order), transformers' GGUF loader gives back our dequantized weights and the same logits and
tokens, the real default model's metadata and tokenizer equal what llama.cpp's converter wrote for it, and
bad input is one error before anything is written."""

from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch
from conftest import TINY_TEXT, _randomize, tiny_family, tiny_llama_config, train_tiny_tokenizer

from peakllm.errors import PeakError
from peakllm.formats.gguf.blocks import BLOCK_TYPES
from peakllm.formats.gguf.reader import hf_row_order, read_block_weights
from peakllm.formats.gguf.writer import GGUFStreamWriter, llamacpp_row_order, write_gguf
from peakllm.solvers.ggml import rtn_ggml

# every block type on some tensor of a model with 256-wide rows (K-quants need multiples of 256)
LAYER_TYPES = [{"q_proj": "Q4_K", "k_proj": "Q5_K", "v_proj": "Q6_K", "o_proj": "Q3_K", "gate_proj": "Q2_K",
                "up_proj": "IQ4_NL", "down_proj": "Q4_0"},
               {"q_proj": "Q8_0", "k_proj": "Q4_1", "v_proj": "Q5_0", "o_proj": "Q5_1", "gate_proj": "Q4_K",
                "up_proj": "Q6_K", "down_proj": "Q5_K"}]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tiny_tokenizer(bos=True)


@pytest.fixture(scope="module")
def written(tmp_path_factory, tokenizer):
    """(path, model, quantized weights by HF name) of a tiny Llama with every block type and an untied head."""
    from transformers import LlamaForCausalLM

    cfg = tiny_llama_config(hidden_size=256, intermediate_size=512, tie_word_embeddings=False, bos_token_id=1)
    model = _randomize(LlamaForCausalLM(cfg), 5)
    quantized = {}
    for name, p in model.named_parameters():
        if ".layers." in name:
            layer = int(name.split(".")[2])
            for key, t in LAYER_TYPES[layer].items():
                if key in name:
                    quantized[name] = rtn_ggml(p.detach(), t)
    quantized["lm_head.weight"] = rtn_ggml(model.lm_head.weight.detach(), "Q6_K")
    assert {q.type for q in quantized.values()} == set(BLOCK_TYPES)
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(model, tokenizer, path, quantized, float_type="F32")
    return path, model, quantized


def test_every_tensor_reads_back_bit_exactly(written):
    path, model, quantized = written
    cfg = model.config
    reader = gguf.GGUFReader(str(path))
    by_name = {t.name: t for t in reader.tensors}
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    params = dict(model.named_parameters())
    assert len(by_name) == len(params)  # untied: output.weight is stored
    for hf_name, p in params.items():
        t = by_name[names.get_name(hf_name, try_suffixes=(".weight",))]
        heads = cfg.num_attention_heads if "q_proj" in hf_name else cfg.num_key_value_heads
        q = quantized.get(hf_name)
        if q is None:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            want = p.detach().numpy()
            if "q_proj" in hf_name or "k_proj" in hf_name:
                want = llamacpp_row_order(want, heads)
            assert np.array_equal(np.asarray(t.data).reshape(want.shape), want)
            continue
        assert t.tensor_type == BLOCK_TYPES[q.type].ggml
        packed, ours = q.pack(), q.dequantize().numpy()
        theirs = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        if "q_proj" in hf_name or "k_proj" in hf_name:
            packed = llamacpp_row_order(packed, heads)
            theirs = hf_row_order(theirs, heads)
        assert np.array_equal(np.asarray(t.data), packed)
        assert np.array_equal(theirs.view(np.int32), ours.view(np.int32))


def test_reader_gives_back_what_was_written(written):
    path, model, quantized = written
    back = read_block_weights(path, model)
    assert set(back) == set(quantized)
    for name, q in quantized.items():
        assert back[name].type == q.type and torch.equal(back[name].codes, q.codes)
        assert all(torch.equal(back[name].params[k], q.params[k]) for k in q.params)


def test_transformers_loader_reads_our_weights_and_logits(written, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, model, quantized = written
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    sd = loaded.state_dict()
    expect = {n: (quantized[n].dequantize() if n in quantized else p.detach()) for n, p in model.named_parameters()}
    for name, w in expect.items():
        assert torch.equal(sd[name], w), name
    reference = _randomize(type(model)(model.config), 0)
    reference.load_state_dict(expect)
    ids = torch.tensor([tokenizer(TINY_TEXT[:200])["input_ids"]])
    with torch.no_grad():
        ours, theirs = loaded(input_ids=ids).logits, reference.eval()(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)  # eps round-trips through fp32 metadata
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert tok(TINY_TEXT[:300])["input_ids"] == tokenizer(TINY_TEXT[:300])["input_ids"]


def test_tied_model_has_no_output_tensor_and_f16_weights(tmp_path, tokenizer):
    model = tiny_family("llama")
    path = tmp_path / "tied.gguf"
    written = write_gguf(model, tokenizer, path)
    reader = gguf.GGUFReader(str(path))
    names = {t.name: t for t in reader.tensors}
    assert "output.weight" not in names and "token_embd.weight" in names
    assert names["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert names["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert int(reader.fields["general.file_type"].contents()) == gguf.LlamaFileType.MOSTLY_F16
    assert [w.name for w in written] == [t.name for t in reader.tensors]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tied.gguf"]  # no temporary file left


def test_bad_input_is_one_error_before_writing(tmp_path, tokenizer, monkeypatch):
    import shutil

    model = tiny_family("llama")
    with pytest.raises(PeakError, match="families"):
        write_gguf(SimpleNamespace(config=SimpleNamespace(model_type="opt")), tokenizer, tmp_path / "q.gguf")
    with pytest.raises(PeakError, match="end in .gguf"):
        write_gguf(model, tokenizer, tmp_path / "x.bin")
    with pytest.raises(PeakError, match="float_type"):
        write_gguf(model, tokenizer, tmp_path / "x.gguf", float_type="BF8")
    with pytest.raises(PeakError, match="quantized shape"):
        write_gguf(model, tokenizer, tmp_path / "x.gguf",
                   {"model.layers.0.mlp.up_proj.weight": rtn_ggml(torch.randn(64, 64), "Q4_0")})
    with pytest.raises(PeakError, match="does not have"):
        write_gguf(model, tokenizer, tmp_path / "x.gguf", {"model.nope.weight": rtn_ggml(torch.randn(4, 32), "Q4_0")})
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(PeakError, match="MB free"):
        write_gguf(model, tokenizer, tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


def test_streamed_writing_equals_the_one_call_in_any_order_and_resumes(tmp_path, tokenizer, written):
    """A meta skeleton plans the file; tensors then arrive one at a time, in any order (a streamed run writes
    the embedding last), and give the same bytes; a killed writer's file is taken back and finished."""
    path, model, quantized = written
    with torch.device("meta"):
        skeleton = type(model)(model.config)
    params = dict(model.named_parameters())
    types = {k: q.type for k, q in quantized.items()}
    out = tmp_path / "streamed.gguf"
    with GGUFStreamWriter(skeleton, tokenizer, out, types, float_type="F32") as s:
        assert not out.exists()
        for t in reversed(s.plan):
            s.write(t.hf_name, quantized.get(t.hf_name, params[t.hf_name]))
    assert out.read_bytes() == path.read_bytes()

    tmp = tmp_path / "part" / "x.gguf.tmp"
    first = GGUFStreamWriter(skeleton, tokenizer, tmp_path / "resumed.gguf", types, float_type="F32", tmp=tmp)
    half = [t.hf_name for t in first.plan[::2]]
    for name in half:
        first.write(name, quantized.get(name, params[name]))
    first.abort(remove=False)  # as a killed run leaves it
    with pytest.raises(PeakError, match="not the unfinished GGUF file"):  # another plan: refused, file kept
        GGUFStreamWriter(skeleton, tokenizer, tmp_path / "resumed.gguf", float_type="F32", tmp=tmp, written=half)
    with GGUFStreamWriter(skeleton, tokenizer, tmp_path / "resumed.gguf", types, float_type="F32", tmp=tmp,
                          written=half) as s:
        for t in s.plan:
            if t.hf_name not in half:
                s.write(t.hf_name, quantized.get(t.hf_name, params[t.hf_name]))
    assert (tmp_path / "resumed.gguf").read_bytes() == path.read_bytes()
    assert list((tmp_path / "part").iterdir()) == []
    (tmp_path / "part").rmdir()
    (tmp_path / "resumed.gguf").unlink()

    with pytest.raises(PeakError, match="already written"):
        with GGUFStreamWriter(skeleton, tokenizer, tmp_path / "bad.gguf", float_type="F32") as s:
            s.write(s.plan[1].hf_name, params[s.plan[1].hf_name])
            s.write(s.plan[1].hf_name, params[s.plan[1].hf_name])
    with pytest.raises(PeakError, match="expected Q6_K"):
        with GGUFStreamWriter(skeleton, tokenizer, tmp_path / "bad.gguf", {"model.embed_tokens.weight": "Q6_K"}) as s:
            s.write("model.embed_tokens.weight", params["model.embed_tokens.weight"])
    with pytest.raises(PeakError, match="unfinished"):
        with GGUFStreamWriter(skeleton, tokenizer, tmp_path / "bad.gguf") as s:
            s.write(s.plan[0].hf_name, params[s.plan[0].hf_name])
    with pytest.raises(PeakError, match="blocks of 256"):  # a 64-wide model cannot take K-quants
        GGUFStreamWriter(tiny_family("llama"), tokenizer, tmp_path / "bad.gguf", {"model.embed_tokens.weight": "Q4_K"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["streamed.gguf"]


@pytest.mark.slow
@pytest.mark.parametrize("source", ["rebuilt", "kept"])
def test_default_model_metadata_and_tokenizer_match_llamacpps_converter(tmp_path, default_model, monkeypatch,
                                                                       source):
    """The default model ships as a GGUF written by llama.cpp's converter: ours carries the same keys and values
    (tokens, types, merges, pre-tokenizer, special ids, chat template, hyperparameters) except the model
    card's (name, license, ...) and the file type, and the same tensor names; both with the tokenizer rebuilt
    from transformers' (as for a model that never was a GGUF) and with the source file's keys kept."""
    from peakllm.formats.gguf.vocab import SOURCE_ATTR
    from peakllm.models import default_gguf_path

    model, tokenizer = default_model
    assert hasattr(tokenizer, SOURCE_ATTR)
    if source == "rebuilt":
        monkeypatch.delattr(tokenizer, SOURCE_ATTR)
    path = tmp_path / "smol.gguf"
    write_gguf(model, tokenizer, path, {"model.layers.0.mlp.down_proj.weight":
                                        rtn_ggml(model.model.layers[0].mlp.down_proj.weight.detach(), "Q4_1")})
    ref, ours = gguf.GGUFReader(str(default_gguf_path())), gguf.GGUFReader(str(path))
    card = {"general.name", "general.basename", "general.finetune", "general.languages", "general.license",
            "general.organization", "general.size_label", "general.file_type"}
    ref_keys = {k for k in ref.fields if not k.startswith("GGUF.")} - card
    assert ref_keys <= set(ours.fields)
    for key in sorted(ref_keys):
        assert ref.fields[key].contents() == ours.fields[key].contents(), key
    assert sorted(t.name for t in ref.tensors) == sorted(t.name for t in ours.tensors)


@pytest.mark.slow
def test_default_models_own_grid_is_read_and_recovered(default_model):
    """The default model is SmolLM2's Q4_1 GGUF dequantized: its stored grids dequantize to the loaded weights
    bit for bit, and rounding a loaded weight onto its stored grid gives the stored codes."""
    from peakllm.models import default_gguf_path

    model, _ = default_model
    grids = read_block_weights(default_gguf_path(), model)
    assert len(grids) == 7 * model.config.num_hidden_layers + 1  # and the token embedding, in Q8_0
    assert grids["model.embed_tokens.weight"].type == "Q8_0" and {g.type for g in grids.values()} == {"Q4_1", "Q8_0"}
    params = dict(model.named_parameters())
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                 "model.layers.29.mlp.down_proj.weight", "model.embed_tokens.weight"):
        g = grids[name]
        assert torch.equal(g.dequantize(), params[name].detach())
        assert torch.equal(rtn_ggml(params[name].detach(), g.type, params=g.params).codes, g.codes)
