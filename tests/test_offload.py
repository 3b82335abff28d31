"""Running under a memory budget (runtime/offload.py): streamed layers and LRU experts read the same
mapped bytes, so the tokens equal the all-in-memory run's bit for bit; the pages really leave memory; a
budget too small to run is refused before any work."""

from __future__ import annotations

import copy

import pytest
import torch

from peakllm.cli import main
from peakllm.errors import PeakError
from peakllm.models import load_model
from peakllm.runtime.generate import generate
from peakllm.runtime.model import RuntimeModel
from peakllm.runtime.pages import file_mappings, resident_bytes

N = 16


def _hf_dir(tmp_path, tiny_tokenizer, **shape):
    """A random Llama with layers of many pages (int4: ~0.4 MB each), saved as an HF folder."""
    from conftest import _randomize, tiny_llama_config
    from transformers import LlamaForCausalLM

    cfg = tiny_llama_config(**{"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 5, **shape})
    path = tmp_path / "hf"
    _randomize(LlamaForCausalLM(cfg), 0).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def _in_memory(hf):
    """The loaded model with every tensor copied out of the file maps."""
    model = copy.deepcopy(hf)
    maps = file_mappings()
    for t in list(model.parameters()) + list(model.buffers()):
        ptr = t.untyped_storage().data_ptr()
        assert not any(lo <= ptr < hi for lo, hi, _o, _p in maps)
    return model


def _tokens(hf, tok, ids, budget=None, engine=True):
    rt = RuntimeModel.from_hf(hf)
    rt.set_max_memory(budget)
    rt.use_step_engine = engine
    out = generate(rt, tok, ids, N, stop_at_eos=False)
    return out, rt


def moe_plan_sizes(hf, seq: int) -> tuple[int, int]:
    """(bytes a MoE keeps resident with every layer's non-expert part, bytes of its largest expert), read off
    the plan of an unlimited budget."""
    probe = RuntimeModel.from_hf(hf)
    probe.set_max_memory(1 << 40)
    probe.setup_cache(1, seq)
    off = probe.offload
    assert off.moe and off.all_resident
    sizes = off.fixed + sum(u.nbytes for u in off.layers), max(u.nbytes for us in off.experts for u in us)
    off.close()
    return sizes


@pytest.fixture(scope="module")
def int4_folder(tmp_path_factory, tiny_tokenizer):
    tmp = tmp_path_factory.mktemp("offload")
    out = tmp / "int4"
    code = main(["quantize", "--model", str(_hf_dir(tmp, tiny_tokenizer)), "--method", "rtn", "--bits", "4",
                 "--group-size", "32", "--eval-tokens", "0", "--stream", "on", "--output", str(out), "--json"])
    assert code == 0  # streamed: one shard per layer, as a big model is written
    return out


@pytest.mark.slow  # 13 s on 2 cores; test_generate_cli_under_a_budget_prints_the_in_memory_text stays fast
def test_streamed_layers_give_the_in_memory_tokens(int4_folder):
    hf, tok = load_model(str(int4_folder))
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    ref, _ = _tokens(_in_memory(hf), tok, ids)
    mapped, _ = _tokens(hf, tok, ids)
    assert torch.equal(mapped, ref)
    layer = RuntimeModel.from_hf(hf)
    layer.set_max_memory(1 << 40)
    layer.setup_cache(2, 9 + N)
    sizes = [u.nbytes for u in layer.offload.layers]
    fixed = layer.offload.fixed
    assert layer.offload.all_resident
    plans = set()
    for extra in (2, 3, 4):  # 0, 1 and 2 layers pinned next to the two streaming slots
        budget = int(fixed + extra * max(sizes))
        for engine in (True, False):
            out, rt = _tokens(hf, tok, ids, budget, engine)
            assert torch.equal(out, ref), (budget, engine)
            off = rt.offload
            plans.add(len(off.pinned))
            assert not off.all_resident and off.streamed
            # every streamed layer but the one read ahead for the next token has left memory
            ahead = off.streamed[0]
            for i in off.streamed:
                if i != ahead:
                    assert resident_bytes(off.layers[i]) == 0, (i, budget)
            for i in off.pinned:
                assert resident_bytes(off.layers[i]) == off.layers[i].mapped
            st = off.stats["decode"]
            assert st["steps"] == N - 1 and st["layer_reads"] == (N - 1) * len(off.streamed)
    assert plans == {0, 1, 2}


def test_too_small_budget_is_refused_with_the_smallest_that_runs(int4_folder):
    hf, _tok = load_model(str(int4_folder))
    rt = RuntimeModel.from_hf(hf)
    rt.set_max_memory(200_000)
    with pytest.raises(PeakError, match="too small.*smallest budget that runs is"):
        rt.setup_cache(1, 16)


def test_weights_copied_into_memory_are_refused(int4_folder):
    hf, _tok = load_model(str(int4_folder))
    rt = RuntimeModel.from_hf(_in_memory(hf))
    rt.set_max_memory(3 << 19)
    with pytest.raises(PeakError, match="memory-mapped"):
        rt.setup_cache(1, 16)


def test_a_written_mapped_weight_is_refused(int4_folder):
    """Dropping a page of a private file map reverts it to the file: offloading refuses a model whose mapped
    weights were written in memory (pages.written), naming the layer, instead of silently undoing the write."""
    hf, _tok = load_model(str(int4_folder))
    maps = file_mappings()
    mapped = [b for b in hf.model.layers[1].buffers()
              if any(lo <= b.untyped_storage().data_ptr() < hi for lo, hi, _o, _p in maps)]
    assert mapped
    flat = mapped[0].view(-1)
    flat[:1].copy_(flat[:1].clone())  # the same value, but the page is now this process's copy
    rt = RuntimeModel.from_hf(hf)
    rt.set_max_memory(200_000)  # unwritten, this budget is refused as too small (the test above)
    with pytest.raises(PeakError, match="layer 1: its mapped weights were modified in memory"):
        rt.setup_cache(1, 16)


def _process_of(monkeypatch, nbytes: int) -> None:
    """The command line's --max-memory is the whole process's: fix what the plan measures of this (pytest)
    process, so a test's budget means the same weights budget on every machine."""
    monkeypatch.setattr("peakllm.runtime.offload.rss_bytes", lambda: nbytes)
    monkeypatch.setattr("peakllm.runtime.offload.resident_bytes", lambda unit: 0)


def test_generate_cli_under_a_budget_prints_the_in_memory_text(int4_folder, capsys, monkeypatch):
    import json

    _process_of(monkeypatch, 100 << 20)

    args = ["generate", "--model", str(int4_folder), "--prompt", "the quick brown", "--max-new-tokens", "12", "--json"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*args, "--max-memory", "101.8MB"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == plain["text"]
    assert main([*args, "--max-memory", "100.5MB"]) == 2
    err = capsys.readouterr().err
    assert "smallest budget that runs" in err and "the process itself holds 100.00 MiB" in err


def test_bench_reports_disk_reads_under_a_budget(int4_folder, capsys, monkeypatch):
    import json

    _process_of(monkeypatch, 100 << 20)
    code = main(["bench", "--model", str(int4_folder), "--max-memory", "101.5MB", "--new-tokens", "4",
                 "--prompt-tokens", "4", "--repeats", "1", "--json"])
    assert code == 0, capsys.readouterr().err
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    plan = row["offload"]
    assert plan["streamed_layers"] >= 2 and not plan["all_resident"]
    assert plan["whole_process"] and plan["process_bytes"] == 100 << 20 and plan["workspace_bytes"] > 0
    assert plan["predicted_peak_bytes"] <= plan["budget_bytes"]
    assert row["offload_bytes_read_per_step"] > 0 and row["decode_tok_s"] > 0


@pytest.fixture(scope="module")
def moe_folder(tmp_path_factory, tiny_tokenizer):
    tmp = tmp_path_factory.mktemp("offload_moe")
    text = tmp / "text.txt"
    text.write_text(("The quick brown fox jumps over the lazy dog. " * 40 + "\n") * 20)
    moe = tmp / "moe"
    assert main(["moefy", "--model", str(_hf_dir(tmp, tiny_tokenizer)), "--experts", "8", "--top-k", "2",
                 "--calib-samples", "2", "--calib-seqlen", "32", "--calib-dataset", str(text),
                 "--output", str(moe)]) == 0
    out = tmp / "moe-int4"
    assert main(["quantize", "--model", str(moe), "--method", "rtn", "--bits", "4", "--group-size", "32",
                 "--eval-tokens", "0", "--stream", "on", "--output", str(out)]) == 0
    return out


@pytest.mark.slow  # with its MoE folder, 40-80 s on 2 cores
@pytest.mark.parametrize("readahead", ["on", "off"])
def test_expert_lru_gives_the_in_memory_tokens(moe_folder, monkeypatch, readahead):
    monkeypatch.setenv("PEAKLLM_EXPERT_READAHEAD", readahead)
    hf, tok = load_model(str(moe_folder))
    ids = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(1))
    ref, _ = _tokens(_in_memory(hf), tok, ids)
    base, expert = moe_plan_sizes(hf, 9 + N)
    rates = {}
    for capacity in (0, 3, 10):
        for engine in (True, False):
            out, rt = _tokens(hf, tok, ids, base + (capacity + 1) * expert, engine)
            assert torch.equal(out, ref), (capacity, engine)
            o = rt.offload
            assert o.capacity == capacity and len(o.lru) <= capacity
            cached = set(o.lru)
            for li, us in enumerate(o.experts):
                for e, unit in enumerate(us):
                    if (li, e) not in cached:
                        assert resident_bytes(unit) == 0
            st = o.stats["decode"]
            assert st["expert_hits"] + st["expert_misses"] > 0
            rates[(capacity, engine)] = o.summary()["expert_hit_rate"]
    assert rates[(0, True)] == 0.0 and rates[(10, True)] >= rates[(3, True)] >= 0.0
    assert rates[(3, True)] == rates[(3, False)]  # both paths see the same routes


def test_report_plots_offload_runs(tmp_path, monkeypatch):
    import json

    from peakllm.eval.report import write_report
    from plot_util import capture_figures

    rows = [{"command": "bench", "decode_tok_s": t, "expert_hit_rate": h,
             "offload": {"experts": 8, "expert_capacity": c, "all_resident": c is None, "budget_bytes": 1}}
            for t, h, c in ((2.0, 0.0, 0), (5.0, 0.5, 4), (9.0, None, None))]
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    drawn = capture_figures(monkeypatch)
    written = write_report(log, tmp_path / "rep")
    assert "offload.png" in written["files"] and (tmp_path / "rep" / "offload.png").is_file()
    ax, twin = drawn["offload.png"]  # x: experts held (all 8 when all are resident); tok/s, and the hit rate
    assert ax["lines"] == {"decode tok/s": ([0, 4, 8], [2.0, 5.0, 9.0])}
    assert twin["lines"] == {"expert hit rate": ([0, 4, 8], [0.0, 0.5, 1.0])}
    assert ax["xlabel"] == "expert cache (experts held in memory)" and twin["ylabel"] == "hit rate"


@pytest.mark.parametrize("fused", [True, False])
def test_serve_runner_under_a_budget_gives_the_in_memory_logits(int4_folder, fused):
    """serve's paged runner calls the same hooks: streamed layers, a KV pool counted in the budget, the same
    logits bit for bit as without a budget, and the streamed layers out of memory between steps."""
    from peakllm.serve.block_manager import BlockManager
    from peakllm.serve.runner import PagedRunner
    from peakllm.serve.scheduler import Scheduler
    from peakllm.serve.sequence import SamplingParams, Sequence
    from test_serve import _drive

    hf, _tok = load_model(str(int4_folder))
    probe = PagedRunner(RuntimeModel.from_hf(hf), 24, 4, max_memory=1 << 40)
    fixed, size = probe.offload.fixed, max(u.nbytes for u in probe.offload.layers)
    assert probe.offload.all_resident and fixed >= probe.kv_bytes
    probe.offload.close()
    logits = {}
    for budget in (None, int(fixed + 3 * size)):
        runner = PagedRunner(RuntimeModel.from_hf(hf), 24, 4, max_memory=budget)
        runner.use_fused = fused
        seqs = [Sequence(list(range(5 + 3 * i, 12 + 4 * i)), SamplingParams(max_tokens=6), lambda *_: None)
                for i in range(3)]
        out = _drive(runner, Scheduler(BlockManager(24, 4), 3, 16), seqs, 6)
        logits[budget] = [torch.stack(out[s.seq_id]) for s in seqs]
        off = runner.offload
        if budget is not None:
            assert len(off.pinned) == 1 and len(off.streamed) == 4
            assert off.stats["decode"]["layer_reads"] > 0 and off.stats["prefill"]["steps"] > 0
            for i in off.streamed[1:]:  # all but the one read ahead for the next step have left memory
                assert resident_bytes(off.layers[i]) == 0
            off.close()
    ref, got = logits.values()
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    with pytest.raises(PeakError, match="too small"):
        PagedRunner(RuntimeModel.from_hf(hf), 24, 4, max_memory=int(fixed))
    if fused:  # what `peakllm serve --max-memory` builds
        from peakllm.serve.server import build_engine

        engine, _ = build_engine(str(int4_folder), num_blocks=24, block_size=4, max_model_len=64,
                                 max_memory=int(fixed + 3 * size))
        assert engine.runner.offload.streamed == [1, 2, 3, 4]
        engine.runner.offload.close()


@pytest.mark.slow  # about 10 s on 2 cores
def test_load_gives_back_the_embedding_pages(tmp_path, tiny_tokenizer):
    """The load check multiplies once through every embedding row; the loader then unmaps those pages, so
    decoding holds only the rows of its tokens (bench's peak RSS at 7B: packed + 0.31-0.35 GB instead of + 0.55)."""
    from peakllm.runtime.embedding import PackedEmbedding
    from peakllm.runtime.pages import Unit, storages

    out = tmp_path / "int4-untied"
    hf_dir = _hf_dir(tmp_path, tiny_tokenizer, vocab_size=32768, tie_word_embeddings=False,
                    num_hidden_layers=1)
    assert main(["quantize", "--model", str(hf_dir), "--method", "rtn", "--bits", "4", "--group-size", "32",
                 "--eval-tokens", "0", "--output", str(out), "--json"]) == 0
    hf, tok = load_model(str(out))
    assert not hf.config.tie_word_embeddings
    emb = hf.get_input_embeddings()
    assert isinstance(emb, PackedEmbedding)
    unit = Unit("embedding", storages(emb), file_mappings())
    assert unit.mapped > 64 * 4096  # the rows are views of the file, many pages of them
    assert resident_bytes(unit) == 0
    ids = torch.tensor([[1000, 1001, 1002]])  # rows on one page of the codes
    emb(ids)
    # a fault maps the page's whole page-cache folio (up to 2 MiB), not the other 8 MiB of codes
    assert 0 < resident_bytes(unit) < unit.mapped // 2
    ref, _ = _tokens(_in_memory(hf), tok, ids)
    mapped, _ = _tokens(hf, tok, ids)
    assert torch.equal(mapped, ref)


def test_report_plots_the_gguf_curve(tmp_path, monkeypatch):
    """bench_gguf_quality's rows: one line per model, tool and evaluator through the median of each size's seeds;
    rows from before the preset rules (a peakllm label without "preset") are left out."""
    import json

    from peakllm.eval.report import write_report
    from plot_util import capture_figures

    def row(tool, preset, bits, ours, theirs):
        return {"bench": "gguf-quality", "tool": tool, "preset": preset, "bits_per_param_total": bits,
                "ppl_peakllm_eval": ours, "ppl_llama_perplexity": theirs}

    rows = [row("llama.cpp version: x", "Q4_0 + imatrix", 5.4, 16.4, 13.4),
            row("llama.cpp version: x", "Q6_K + imatrix", 6.6, 15.5, 12.7),
            row("peakllm", "GPTQ, preset Q4_0", 5.4, 16.3, 13.3),
            row("peakllm", "GPTQ, preset Q4_0", 5.4, 16.5, 13.5),
            row("peakllm", "GPTQ, preset Q4_0", 5.4, 16.1, 13.2),
            row("peakllm", "GPTQ onto Q4_0 (compared with Q4_0)", 5.4, 99.0, 99.0),
            {**row("llama.cpp version: x", "Q4_0 + imatrix", 5.0, 30.0, 25.0), "model": "gemma-3-270m"}]
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    drawn = capture_figures(monkeypatch)
    written = write_report(log, tmp_path / "rep")
    assert "gguf.png" in written["files"]
    (ax,) = drawn["gguf.png"]
    assert ax["lines"] == {
        "llama-quantize + imatrix, peakllm eval, default": ([5.4, 6.6], [16.4, 15.5]),
        "peakllm (GPTQ on the types), peakllm eval, default": ([5.4], [16.3]),
        "llama-quantize + imatrix, llama-perplexity, default": ([5.4, 6.6], [13.4, 12.7]),
        "peakllm (GPTQ on the types), llama-perplexity, default": ([5.4], [13.3]),
        "llama-quantize + imatrix, peakllm eval, gemma-3-270m": ([5.0], [30.0]),
        "llama-quantize + imatrix, llama-perplexity, gemma-3-270m": ([5.0], [25.0]),
    }
    assert ax["xlabel"].startswith("bits per parameter (whole .gguf file")


@pytest.mark.subprocess
def test_bench_max_memory_holds_the_whole_process(int4_folder):
    """--max-memory is a promise about the process: a budget below what Python and torch hold is refused
    before any work, naming that part and the smallest budget that runs; a budget a little above that one runs,
    streams, and is never exceeded (VmHWM, loading included: the loader hands back the pages its checks
    touched)."""
    import json
    import re
    import subprocess
    import sys

    def bench(budget: str):
        proc = subprocess.run([sys.executable, "-m", "peakllm", "bench", "--model", str(int4_folder), "--max-memory",
                               budget, "--new-tokens", "4", "--prompt-tokens", "8", "--repeats", "1", "--threads",
                               "1", "--json"], capture_output=True, text=True, timeout=600)
        return proc.returncode, proc.stdout, proc.stderr

    code, _, err = bench("1MB")
    held = re.search(r"the process itself holds ([0-9.]+) MiB", err)
    smallest = re.search(r"smallest budget that runs is ([0-9.]+) MiB", err)
    assert code == 2 and held and smallest, err
    assert float(held.group(1)) > 100  # Python + torch: far above a tiny model's weights
    budget = int((float(smallest.group(1)) + 16) * 2**20)  # the next process measures itself again: some slack
    code, out, err = bench(str(budget))
    assert code == 0, err
    row = json.loads(out.strip().splitlines()[-1])
    assert row["offload"]["whole_process"] and row["offload"]["predicted_peak_bytes"] <= budget
    assert row["peak_rss_bytes"] <= budget, (row["peak_rss_bytes"], row["offload"])
