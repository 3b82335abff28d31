"""Progress with --json: stdout keeps exactly one JSON object; bars and per-layer lines go to stderr when it is
a terminal or --progress is given, and other libraries' bars never do."""

import io
import json
import re
import sys

import pytest

from peakllm.cli import main


def quantize(capsys, tmp_path, model_dir, text_file, *extra):
    capsys.readouterr()  # what the fixtures printed (transformers saving the tiny model) is not the command's
    return main(["quantize", "--model", str(model_dir), "--calib-dataset", str(text_file), "--calib-samples", "3",
                 "--calib-seqlen", "32", "--eval-dataset", str(text_file), "--eval-tokens", "512", "--group-size", "32",
                 "--output", str(tmp_path / "q"), "--json", *extra])


def one_json_object(text: str) -> dict:
    result = json.loads(text)  # fails on anything but one JSON document
    assert isinstance(result, dict) and text.count("\n") == 1
    return result


def test_json_with_progress_gives_per_layer_lines_on_stderr(capsys, tmp_path, tiny_model_dir, text_file):
    assert quantize(capsys, tmp_path, tiny_model_dir, text_file, "--progress") == 0
    captured = capsys.readouterr()
    assert one_json_object(captured.out)["method"] == "gptq"
    lines = captured.err.splitlines()
    # stderr is not a terminal here: one plain line per finished layer, no carriage returns
    assert "\r" not in captured.err
    for done in ("0/2", "1/2", "2/2"):
        assert sum(bool(re.match(rf"calibrating \(gptq\):.*\| {done} ", line)) for line in lines) == 1, captured.err
    assert any(line.startswith("perplexity:") for line in lines)


def test_json_alone_off_a_terminal_draws_no_bars(capsys, tmp_path, tiny_model_dir, text_file):
    assert quantize(capsys, tmp_path, tiny_model_dir, text_file) == 0
    captured = capsys.readouterr()
    one_json_object(captured.out)
    assert "%|" not in captured.err and "calibrating" not in captured.err  # no bar, ours or a library's


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_json_on_a_terminal_draws_bars(monkeypatch, capsys, tmp_path, tiny_model_dir, text_file):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert quantize(capsys, tmp_path, tiny_model_dir, text_file) == 0
    one_json_object(capsys.readouterr().out)
    assert "calibrating (gptq)" in terminal.getvalue() and "2/2" in terminal.getvalue()


@pytest.mark.parametrize("command", ["prune", "quantize", "eval", "moefy", "synth"])
def test_long_commands_take_progress(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "--progress" in capsys.readouterr().out


def test_loading_a_compressed_tensors_folder_draws_no_library_bars(capsys, tmp_path, tiny_model_dir, text_file):
    """compressed-tensors draws "Compressing model" while transformers loads its folder, and "Decompressing
    model" on the first forward pass; peakllm's progress must show neither."""
    assert quantize(capsys, tmp_path, tiny_model_dir, text_file, "--method", "rtn", "--sym", "--format",
                    "compressed-tensors") == 0
    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path / "q"), "--dataset", str(text_file), "--max-tokens", "512",
                 "--json", "--progress"]) == 0
    captured = capsys.readouterr()
    one_json_object(captured.out)
    assert "perplexity" in captured.err
    for library_bar in ("Compressing model", "Decompressing model", "Applying quantization", "Dispatching model"):
        assert library_bar not in captured.err
