"""peakllm generate: continue a prompt, streaming tokens as they are produced."""

from __future__ import annotations

import sys
import time

from peakllm.cli.common import (add_adapter_option, add_bos_option, add_act_option, add_max_memory_run_option,
                                add_model_option, add_output_options, add_threads_option, apply_act, emit,
                                read_adapter_arg, set_threads)
from peakllm.errors import PeakError

DEFAULT_K = 4  # runtime.speculate.DEFAULT_K, without importing torch to build the parser


def register(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt (streams tokens)",
                       description="Generate a continuation of --prompt with the model, streaming text to stdout. "
                       "Greedy by default; --temperature > 0 samples (with --top-p nucleus filtering).")
    add_model_option(p)
    p.add_argument("--prompt", default="The capital of France is", help="text to continue (default: %(default)r)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template (instruct models)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens to generate (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument("--speculate", type=int, default=None, metavar="K",
                   help="speculative decoding: K tokens drafted per step and verified by the model in one pass "
                   "(greedy output unchanged, sampling's distribution unchanged); 0 = off (default: "
                   f"{DEFAULT_K} with --draft, else off)")
    p.add_argument("--draft", metavar="MODEL", default=None,
                   help="the draft model for --speculate: a more compressed form of the same model (e.g. a folder "
                   "from `peakllm quantize --bits 2`); without it, drafts come from prompt lookup (the tokens "
                   "that followed the last n-gram's latest earlier occurrence)")
    add_adapter_option(p)
    add_bos_option(p)
    add_max_memory_run_option(p)
    add_act_option(p)
    add_threads_option(p)
    add_output_options(p)
    p.set_defaults(func=run)


def prompt_ids(tokenizer, prompt: str, chat: bool, bos: bool = True):
    """The prompt's ids [1, T]; they start with BOS when the tokenizer adds it (once: a chat template that
    writes BOS itself is not given a second one), unless `bos` is False."""
    import torch

    from peakllm.data import protocol_bos

    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise PeakError("this model's tokenizer has no chat template; drop --chat")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(torch.long)
    if ids.numel() == 0:
        raise PeakError("the prompt is empty")
    bos_id = protocol_bos(tokenizer, bos)
    if bos_id is not None and int(ids[0, 0]) != bos_id:
        ids = torch.cat([torch.tensor([[bos_id]]), ids], dim=1)
    return ids


def run(args) -> int:
    from peakllm import memory
    from peakllm.data import protocol_bos
    from peakllm.models import load_model
    from peakllm.runtime.generate import generate_text

    set_threads(args.threads)
    apply_act(args.act)
    if args.max_new_tokens < 1:
        raise PeakError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise PeakError("--temperature must be >= 0 and --top-p in (0, 1]")
    speculate = args.speculate if args.speculate is not None else (DEFAULT_K if args.draft else 0)
    if speculate < 0:
        raise PeakError(f"--speculate must be >= 0 tokens, got {speculate}")
    if args.draft and speculate == 0:
        raise PeakError("--draft needs --speculate K > 0")
    if (speculate or args.draft) and args.max_memory:
        raise PeakError("--speculate / --draft need the lean runtime with the model in memory: drop --max-memory")
    budget = memory.parse_size(args.max_memory) if args.max_memory else None
    adapter = read_adapter_arg(args)
    model, tokenizer = load_model(args.model)
    if adapter is not None:
        from peakllm.runtime.adapter import attach_adapter

        attach_adapter(model, adapter)
    draft = load_model(args.draft)[0] if args.draft else None
    ids = prompt_ids(tokenizer, args.prompt, args.chat, bos=not args.no_bos)
    stream = None if args.json else (lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
    if stream:
        sys.stdout.write(args.prompt if not args.chat else "")
    start = time.perf_counter()
    extra: dict = {}  # what speculative decoding did
    timings: dict = {}
    text, n_new = generate_text(model, tokenizer, ids, args.max_new_tokens, temperature=args.temperature,
                                top_p=args.top_p, seed=args.seed, stream=stream, max_memory=budget,
                                speculate=speculate, draft_model=draft, timings=timings)
    if timings.get("speculative"):
        extra = {"speculate": speculate, "draft": args.draft or "prompt-lookup", "drafted": timings["drafted"],
                 "accepted": timings["accepted"], "verify_steps": timings["steps"]}
    seconds = time.perf_counter() - start
    result = {"model": args.model, **({"adapter": args.adapter} if args.adapter else {}), "prompt": args.prompt, "text": text, "new_tokens": n_new, "seconds": seconds,
              "bos": int(ids[0, 0]) == protocol_bos(tokenizer, not args.no_bos),
              "tokens_per_second": n_new / seconds, **extra}
    if stream:
        sys.stdout.write("\n")
        print(f"[{n_new} tokens in {seconds:.2f} s, {n_new / seconds:.1f} tok/s]", file=sys.stderr)
    emit(result, args, "generation", show=stream is None)
    return 0
