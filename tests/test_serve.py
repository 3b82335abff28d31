"""The serve engine without HTTP: paged attention against HF logits, scheduling, preemption, blocks."""

from __future__ import annotations

import threading

import pytest
import torch

from peakllm.errors import PeakError
from peakllm.runtime.model import RuntimeModel
from peakllm.serve.block_manager import BlockManager
from peakllm.serve.engine import Engine, QueueFull
from peakllm.serve.protocol import TextOut
from peakllm.serve.runner import PagedRunner
from peakllm.serve.scheduler import Scheduler
from peakllm.serve.sequence import SamplingParams, Sequence
from serve_util import greedy_reference, trusted_len
from test_runtime_model import _tiny


def _model(kind: str):
    if kind != "mistral":
        return _tiny(kind)
    import transformers

    from conftest import _randomize

    config = transformers.MistralConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                        sliding_window=64, eos_token_id=0)
    return _randomize(transformers.MistralForCausalLM(config), 3)


def _drive(runner, scheduler, seqs, max_new):
    """Run the scheduler/runner by hand (greedy); returns {seq_id: [logits of each sampled token]}."""
    logits_of = {s.seq_id: [] for s in seqs}
    for s in seqs:
        scheduler.add(s)
    for _ in range(1000):
        work = scheduler.schedule()
        if not work:
            break
        assert sum(w.n for w in work) <= scheduler.max_step_tokens
        logits = iter(runner.forward(work))
        for w in work:
            w.seq.num_computed = w.start + w.n
            scheduler.blocks.register(w.seq)
            if w.sample:
                row = next(logits)
                logits_of[w.seq.seq_id].append(row)
                w.seq.tokens.append(int(row.argmax()))
                if w.seq.num_generated == max_new:
                    scheduler.remove(w.seq)
    assert not scheduler.has_work()
    return logits_of


@pytest.mark.parametrize("fused", [True, False])
# gemma3: (1 + w) and post-output norms, scaled embeddings, GeGLU, 5-token windows on local layers with their
# own RoPE table (sequences here cross the window); phi3: fused qkv and gate_up projections
@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "mistral", "phi3", "gemma3"])
@pytest.mark.parametrize("num_blocks", [64, 7])  # 7 blocks of 4 tokens cannot hold three sequences: preemption
def test_paged_logits_match_hf(kind, num_blocks, fused):
    hf = _model(kind)
    model = RuntimeModel.from_hf(hf, torch.float32, max_seq=128)
    runner, blocks = PagedRunner(model, num_blocks, 4), BlockManager(num_blocks, 4)
    runner.use_fused = fused
    scheduler = Scheduler(blocks, max_batch=3, max_step_tokens=8)  # prompts of 11 tokens go in chunks
    g = torch.Generator().manual_seed(1)
    seqs = [Sequence(torch.randint(1, 300, (n,), generator=g).tolist(), SamplingParams(), print) for n in (5, 11, 3)]
    got = _drive(runner, scheduler, seqs, max_new=12)
    for s in seqs:
        with torch.no_grad():
            ref = hf(torch.tensor([s.tokens])).logits[0].float()
        P = len(s.prompt)
        torch.testing.assert_close(torch.stack(got[s.seq_id]), ref[P - 1:P - 1 + 12], rtol=1e-4, atol=1e-4)
    assert blocks.num_free == num_blocks
    assert (scheduler.preemptions > 0) == (num_blocks == 7)


def test_scheduler_puts_decodes_first_and_chunks_prompts():
    blocks = BlockManager(100, 4)
    scheduler = Scheduler(blocks, max_batch=4, max_step_tokens=6)
    a = Sequence(list(range(1, 4)), SamplingParams(), print)
    scheduler.add(a)
    (w,) = scheduler.schedule()
    assert (w.seq, w.start, w.n, w.sample) == (a, 0, 3, True)
    a.num_computed = 3
    a.tokens.append(7)  # a now decodes
    b = Sequence(list(range(1, 21)), SamplingParams(), print)
    scheduler.add(b)
    work = scheduler.schedule()
    assert [(x.seq, x.start, x.n, x.sample) for x in work] == [(a, 3, 1, True), (b, 0, 5, False)]
    assert len(b.block_table) == 2 and len(a.block_table) == 1


def _engine(max_queue=64, **kw):
    from conftest import tiny_llama_config  # noqa: F401 - the tiny tokenizer fixture needs conftest anyway

    hf = _tiny("llama")
    return hf, Engine(RuntimeModel.from_hf(hf, torch.float32, max_seq=128), _NoTok(), max_queue=max_queue, **kw)


class _NoTok:
    eos_token_id = 0


def test_engine_thread_serves_concurrent_requests_like_greedy_reference():
    hf, engine = _engine(num_blocks=12, block_size=4, max_batch=4, max_step_tokens=8)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 300, (n,), generator=g).tolist() for n in (9, 4, 13, 6, 2, 7)]
    results = {i: [] for i in range(len(prompts))}
    done = {i: threading.Event() for i in range(len(prompts))}
    reasons = {}

    def emit_for(i):
        def emit(kind, value):
            if kind == "token":
                results[i].append(value)
            else:
                reasons[i] = (kind, value)
                done[i].set()
        return emit

    engine.warmup()
    assert engine.blocks.num_free == 12
    engine.start()
    try:
        for i, p in enumerate(prompts):
            engine.submit(p, SamplingParams(max_tokens=10), emit_for(i))
        assert all(done[i].wait(60) for i in done)
    finally:
        engine.stop()
    compared = 0
    for i, p in enumerate(prompts):
        ref, margins = greedy_reference(hf, p, 10, {0})
        n = trusted_len(margins)
        assert results[i][:n] == ref[:n]
        compared += n
        if n == len(ref):
            assert reasons[i] == ("done", "stop" if ref[-1] == 0 else "length")
    assert compared >= 30  # the comparison is not vacuous
    assert engine.scheduler.preemptions > 0  # 12 blocks of 4 for 6 sequences of up to 23 tokens
    assert engine.blocks.num_free == 12 and not engine.scheduler.has_work()


def test_engine_refuses_what_cannot_run_and_bounds_its_queue():
    _, engine = _engine(max_queue=2, num_blocks=4, block_size=4)  # not started: requests stay queued
    assert engine.max_model_len == 16  # the pool holds 16 tokens, the model 128
    with pytest.raises(PeakError, match="context of 16"):
        engine.submit([1] * 10, SamplingParams(max_tokens=10), print)
    with pytest.raises(PeakError, match="empty"):
        engine.submit([], SamplingParams(max_tokens=1), print)
    engine.submit([1, 2], SamplingParams(max_tokens=2), print)
    engine.submit([1, 2], SamplingParams(max_tokens=2), print)
    with pytest.raises(QueueFull):
        engine.submit([1, 2], SamplingParams(max_tokens=2), print)


def test_unsupported_model_is_refused(tmp_path, tiny_tokenizer):
    from transformers import OPTConfig, OPTForCausalLM

    from peakllm.serve.server import build_engine

    config = OPTConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=2,
                       word_embed_proj_dim=32, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
                       pad_token_id=0)
    OPTForCausalLM(config).save_pretrained(tmp_path / "opt")  # peakllm loads it; serve does not run it
    tiny_tokenizer.save_pretrained(tmp_path / "opt")
    with pytest.raises(PeakError, match="serve runs llama, .*, gemma3_text models, not 'opt'"):
        build_engine(str(tmp_path / "opt"))


def test_text_out_holds_back_partial_stop_strings(tiny_tokenizer):
    ids = tiny_tokenizer("The quick brown fox jumps", add_special_tokens=False)["input_ids"]
    out = TextOut(tiny_tokenizer, eos={0}, stops=["fox"])
    pieces, stopped = [], False
    for t in ids:
        piece, stopped = out.push(t)
        pieces.append(piece)
        if stopped:
            break
    assert stopped and "".join(pieces) == "The quick brown "
    plain = TextOut(tiny_tokenizer, eos={0}, stops=[])
    text = "".join(plain.push(t)[0] for t in ids + [0]) + plain.finish()[0]
    assert text == "The quick brown fox jumps"


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_prefix_sharing_reuses_full_blocks_and_keeps_logits(kind):
    hf = _tiny(kind)
    model = RuntimeModel.from_hf(hf, torch.float32, max_seq=128)
    runner, blocks = PagedRunner(model, 64, 4), BlockManager(64, 4)
    scheduler = Scheduler(blocks, max_batch=4, max_step_tokens=8)
    g = torch.Generator().manual_seed(2)
    common = torch.randint(1, 300, (13,), generator=g).tolist()
    own = [torch.randint(1, 300, (n,), generator=g).tolist() for n in (3, 5, 6)]
    first = Sequence(common + own[0], SamplingParams(), print)
    got = _drive(runner, scheduler, [first], max_new=8)
    assert blocks.reused_tokens == 0
    # later prompts: two share the 13 common tokens (3 full blocks), one repeats the first prompt (16 tokens:
    # its first 3 blocks; the block holding its last token is computed again)
    later = [Sequence(common + own[1], SamplingParams(), print), Sequence(common + own[2], SamplingParams(), print),
             Sequence(list(first.prompt), SamplingParams(), print)]
    got.update(_drive(runner, scheduler, later, max_new=8))
    assert blocks.reused_tokens == 3 * 12
    for s in [first, *later]:
        with torch.no_grad():
            ref = hf(torch.tensor([s.tokens])).logits[0].float()
        P = len(s.prompt)
        torch.testing.assert_close(torch.stack(got[s.seq_id]), ref[P - 1:P - 1 + 8], rtol=1e-4, atol=1e-4)
    assert blocks.num_free == 64 and not any(blocks.refs)


@pytest.mark.parametrize("kind", ["llama", "qwen3", "phi3", "gemma3"])
def test_bf16_paged_tracks_hf_bf16(kind):
    hf = _tiny(kind).to(torch.bfloat16)
    model = RuntimeModel.from_hf(hf, torch.bfloat16, max_seq=128)
    runner, blocks = PagedRunner(model, 16, 4), BlockManager(16, 4)
    assert runner.k_pool.dtype == torch.bfloat16
    scheduler = Scheduler(blocks, max_batch=2, max_step_tokens=4)
    g = torch.Generator().manual_seed(6)
    seqs = [Sequence(torch.randint(1, 300, (n,), generator=g).tolist(), SamplingParams(), print) for n in (3, 7)]
    got = _drive(runner, scheduler, seqs, max_new=9)
    for s in seqs:
        with torch.no_grad():
            ref = hf(torch.tensor([s.tokens])).logits[0].float()
        P = len(s.prompt)
        out, ref = torch.stack(got[s.seq_id]).float(), ref[P - 1:P - 1 + 9]
        # as for RuntimeModel in bf16: rounding differs in order only, a few units of bf16 precision
        assert (out - ref).abs().max().item() <= 0.03 * ref.abs().max().item()


def test_sliding_window_caps_the_context():
    # beyond the window the model's attention would differ from full attention over the paged cache
    model = RuntimeModel.from_hf(_model("mistral"), torch.float32, max_seq=128)
    engine = Engine(model, _NoTok(), num_blocks=64, block_size=4)
    assert engine.max_model_len == 64
    with pytest.raises(PeakError, match="context of 64"):
        engine.check_request(60, 8)


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_random_workload_with_shared_prefixes_and_preemption(kind):
    """20 requests with shared prompt prefixes and random lengths through a pool too small for them: every
    answer is the greedy reference (up to a near tie), blocks are shared and preempted, none leak."""
    import random

    hf = _model(kind)
    engine = Engine(RuntimeModel.from_hf(hf, torch.float32, max_seq=128), _NoTok(), num_blocks=20, block_size=4,
                    max_batch=6, max_step_tokens=10)
    rng = random.Random(0)
    bases = [[rng.randrange(1, 300) for _ in range(rng.randrange(3, 14))] for _ in range(4)]
    prompts = [rng.choice(bases) + [rng.randrange(1, 300) for _ in range(rng.randrange(0, 6))] for _ in range(20)]
    tokens, done = {i: [] for i in range(20)}, {i: threading.Event() for i in range(20)}

    def emit_for(i):
        return lambda kind, value: tokens[i].append(value) if kind == "token" else done[i].set()

    lengths = [rng.randrange(1, 30) for _ in prompts]
    engine.start()
    try:
        for i, p in enumerate(prompts):
            engine.submit(p, SamplingParams(max_tokens=lengths[i], stop_at_eos=False), emit_for(i))
        assert all(d.wait(120) for d in done.values())
    finally:
        engine.stop()
    assert [len(tokens[i]) for i in range(20)] == lengths
    compared = 0
    for i, p in enumerate(prompts):
        ref, margins = greedy_reference(hf, p, len(tokens[i]), set())
        n = trusted_len(margins)
        assert tokens[i][:n] == ref[:n], i
        compared += n
    assert compared >= 200
    assert engine.scheduler.preemptions > 0 and engine.blocks.reused_tokens > 0
    assert engine.blocks.num_used == 0
