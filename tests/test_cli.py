import json

import pytest
import torch

from peakllm.cli import COMMANDS, build_parser, main
from plot_util import capture_figures


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: peakllm {command} ")
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    for action in sub._actions:  # every option is listed and says what it does
        if action.help != "==SUPPRESS==":
            assert action.help and all(opt in out for opt in action.option_strings), (command, action.dest)


@pytest.mark.parametrize("command", ["prune", "quantize"])
def test_format_help_describes_exactly_the_formats_offered(command):
    from peakllm.formats.writer import FORMATS

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    action = next(a for a in sub._actions if a.dest == "format")
    described = {f for f in FORMATS if f"{f}:" in action.help}
    assert described == set(action.choices), (command, action.help)


def test_eval_json(capsys, tiny_model_dir, text_file, tiny_llama, tiny_tokenizer):
    code, out, _ = run_cli(capsys, "eval", "--model", str(tiny_model_dir), "--dataset", str(text_file),
                           "--seqlen", "32", "--max-tokens", "128", "--json")
    assert code == 0
    result = json.loads(out)
    assert {"ppl", "tokens", "seqlen", "seconds", "tokens_per_second", "model", "dataset"} <= result.keys()
    assert result["tokens"] == 128 and result["seqlen"] == 32
    from test_eval import hand_perplexity  # the protocol written out, on the same model and text

    ids = tiny_tokenizer(text_file.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"][:128]
    expected, n_pred = hand_perplexity(tiny_llama, torch.tensor(ids), 32)
    assert n_pred == 4 * 31 and result["ppl"] == pytest.approx(expected, rel=1e-4)


def test_log_report_and_info(capsys, monkeypatch, tmp_path, tiny_model_dir, text_file):
    log = tmp_path / "results.jsonl"
    for dtype in ("fp32", "bf16"):
        code, out, _ = run_cli(capsys, "eval", "--model", str(tiny_model_dir), "--dataset", str(text_file),
                               "--seqlen", "32", "--max-tokens", "64", "--dtype", dtype, "--log", str(log))
        assert code == 0 and "ppl" in out
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["dtype"] for r in logged] == ["fp32", "bf16"]
    drawn = capture_figures(monkeypatch)
    code, out, _ = run_cli(capsys, "report", str(log), "--output", str(tmp_path / "report"), "--json")
    assert code == 0 and json.loads(out)["records"] == 2
    assert "| ppl |" in (tmp_path / "report" / "report.md").read_text()
    (ax,) = drawn["eval.png"]  # one bar per evaluation, its height the logged perplexity
    assert ax["bars"] == [r["ppl"] for r in logged] and ax["ylabel"] == "perplexity"
    assert ["fp32" in t for t in ax["xticklabels"]] == [True, False] and "bf16" in ax["xticklabels"][1]
    assert (tmp_path / "report" / "eval.png").is_file()
    code, out, _ = run_cli(capsys, "info", "--model", str(tiny_model_dir), "--json")
    info = json.loads(out)
    # tied embedding 300 x 64; per layer q, o 64 x 64, k, v 64 x 32 (2 KV heads of 16), gate, up, down 64 x 128,
    # two norms of 64; the final norm
    assert code == 0 and info["layers"] == 2 and info["parameters"] == 300 * 64 + 2 * (
        2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64) + 64


def test_generate_json(capsys, tiny_model_dir):
    code, out, _ = run_cli(capsys, "generate", "--model", str(tiny_model_dir), "--prompt", "The quick",
                           "--max-new-tokens", "5", "--json")
    assert code == 0 and json.loads(out)["new_tokens"] <= 5


@pytest.mark.parametrize("argv,message", [
    (["eval", "--model", "/no/such/model"], "not found"),
    (["eval", "--model", "TINY", "--dataset", "/no/such.txt"], "unknown dataset"),
    (["eval", "--model", "TINY", "--seqlen", "1"], "seqlen"),
    (["generate", "--model", "TINY", "--max-new-tokens", "0"], "max-new-tokens"),
    (["report", "/no/results.jsonl", "--output", "OUT"], "not found"),
])
def test_bad_input_one_line_error(capsys, tmp_path, tiny_model_dir, argv, message):
    capsys.readouterr()  # what the fixture printed writing the tiny model is not the command's
    argv = [str(tiny_model_dir) if a == "TINY" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err
    assert not (tmp_path / "out").exists()


def test_no_command_prints_the_commands_and_fails(capsys):
    code, out, _ = run_cli(capsys)
    assert code == 2 and out.startswith("usage: peakllm ")
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert list(sub.choices) == COMMANDS
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("    ") and line.split()]
    assert [c for c in listed if c in COMMANDS] == COMMANDS  # each command listed with its one-line help


@pytest.mark.slow
def test_default_model_eval_and_generate(capsys):
    code, out, _ = run_cli(capsys, "eval", "--max-tokens", "1024", "--json")
    result = json.loads(out)
    assert code == 0 and 5 < result["ppl"] < 40 and result["tokens"] == 1024
    code, out, _ = run_cli(capsys, "generate", "--prompt", "The capital of France is", "--max-new-tokens", "4", "--json")
    assert code == 0 and "Paris" in json.loads(out)["text"]


def test_report_curve_places_moe_runs_by_their_experts_bits(tmp_path, monkeypatch):
    """size.png: one curve per way of compressing, MoE runs placed by the experts' bits/param."""
    from peakllm.eval.report import _point_label, _series, write_report

    rows = [{"command": "quantize", "method": "gptq", "bits": "ternary", "target_bits": t, "levels": lv,
             "bit_allocation": al, "bits_per_param": 9.0, "bits_per_param_experts": b, "ppl": p, "dense_ppl": 24.6}
            for t, lv, al, b, p in ((0.8, "matched", "experts", 0.79, 5e4), (0.7, "matched", "matrix", 0.69, 9e4),
                                    (None, None, None, 1.0, 1e6))]
    rows.append({"command": "quantize", "method": "gptq", "bits": 2, "group_size": 64, "bits_per_param": 9.5,
                 "bits_per_param_experts": 2.1, "ppl": 700.0, "dense_ppl": 24.6})
    assert _series(rows[0]) == "gptq ternary rate-controlled, matched levels, experts share the budget"
    assert _series(rows[2]) == "gptq ternary" and _series(rows[3]) == "gptq 2"  # group size: the curve's knob
    assert _point_label(rows[3]) == "g64" and _point_label(rows[0]) == ""
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    drawn = capture_figures(monkeypatch)
    written = write_report(log, tmp_path / "rep")
    assert "size.png" in written["files"] and (tmp_path / "rep" / "size.png").is_file()
    (ax,) = drawn["size.png"]
    assert ax["lines"] == {  # (x: the experts' bits/param, y: ppl) of each curve, and the dense model's line
        "gptq ternary rate-controlled, matched levels, experts share the budget": ([0.79], [5e4]),
        "gptq ternary rate-controlled, matched levels": ([0.69], [9e4]),
        "gptq ternary": ([1.0], [1e6]), "gptq 2": ([2.1], [700.0]), "uncompressed": ([0, 1], [24.6, 24.6])}
    assert ax["texts"] == [("g64", (2.1, 700.0))] and ax["yscale"] == "log"
    assert ax["xlabel"] == "bits per parameter (experts, all metadata)" and ax["ylabel"] == "perplexity"
