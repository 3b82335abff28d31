import json

import pytest

from peakllm.cli import COMMANDS, build_parser, main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert len(capsys.readouterr().out) > 200


@pytest.mark.parametrize("command", ["prune", "quantize"])
def test_format_help_describes_exactly_the_formats_offered(command):
    from peakllm.formats.writer import FORMATS

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    action = next(a for a in sub._actions if a.dest == "format")
    described = {f for f in FORMATS if f"{f}:" in action.help}
    assert described == set(action.choices), (command, action.help)


def test_eval_json(capsys, tiny_model_dir, text_file):
    code, out, _ = run_cli(capsys, "eval", "--model", str(tiny_model_dir), "--dataset", str(text_file),
                           "--seqlen", "32", "--max-tokens", "128", "--json")
    assert code == 0
    result = json.loads(out)
    assert {"ppl", "tokens", "seqlen", "seconds", "tokens_per_second", "model", "dataset"} <= result.keys()
    assert result["tokens"] == 128 and result["seqlen"] == 32 and 1 < result["ppl"] < 1e4


def test_log_report_and_info(capsys, tmp_path, tiny_model_dir, text_file):
    log = tmp_path / "results.jsonl"
    for dtype in ("fp32", "bf16"):
        code, out, _ = run_cli(capsys, "eval", "--model", str(tiny_model_dir), "--dataset", str(text_file),
                               "--seqlen", "32", "--max-tokens", "64", "--dtype", dtype, "--log", str(log))
        assert code == 0 and "ppl" in out
    assert len(log.read_text().splitlines()) == 2
    code, out, _ = run_cli(capsys, "report", str(log), "--output", str(tmp_path / "report"), "--json")
    assert code == 0 and json.loads(out)["records"] == 2
    assert "| ppl |" in (tmp_path / "report" / "report.md").read_text()
    assert (tmp_path / "report" / "eval.png").stat().st_size > 1000
    code, out, _ = run_cli(capsys, "info", "--model", str(tiny_model_dir), "--json")
    info = json.loads(out)
    assert code == 0 and info["layers"] == 2 and info["parameters"] > 0


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
    argv = [str(tiny_model_dir) if a == "TINY" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err
    assert not (tmp_path / "out").exists()


def test_parser_builds():
    assert build_parser().prog == "peakllm"


@pytest.mark.slow
def test_default_model_eval_and_generate(capsys):
    code, out, _ = run_cli(capsys, "eval", "--max-tokens", "1024", "--json")
    result = json.loads(out)
    assert code == 0 and 5 < result["ppl"] < 40 and result["tokens"] == 1024
    code, out, _ = run_cli(capsys, "generate", "--prompt", "The capital of France is", "--max-new-tokens", "4", "--json")
    assert code == 0 and "Paris" in json.loads(out)["text"]


def test_report_curve_places_moe_runs_by_their_experts_bits(tmp_path):
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
    written = write_report(log, tmp_path / "rep")
    assert "size.png" in written["files"] and (tmp_path / "rep" / "size.png").stat().st_size > 1000
