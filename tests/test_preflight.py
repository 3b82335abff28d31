"""Every check that the model's shapes allow fires before evaluation and calibration start: those are patched
to fail the test if they are reached, so a check that came late would show as the wrong error."""

import shutil
from collections import namedtuple

import pytest

from peakllm.cli import main
from peakllm.calibrate.preflight import group_hint


@pytest.fixture
def no_work(monkeypatch):
    def reached(*_a, **_k):
        raise AssertionError("evaluation or calibration started before the checks")

    from peakllm.calibrate import run as compression_run, run_streamed

    for module in (compression_run, run_streamed):  # where the runs look these names up
        monkeypatch.setattr(module, "calibrate", reached)
    monkeypatch.setattr(compression_run, "cached_evaluate", reached)
    monkeypatch.setattr(compression_run, "evaluate", reached)


def run(tmp_path, model_dir, text_file, *extra):
    out = tmp_path / "out"
    code = main(["quantize", "--model", str(model_dir), "--calib-dataset", str(text_file), "--calib-samples", "2",
                 "--calib-seqlen", "32", "--eval-dataset", str(text_file), "--eval-tokens", "512",
                 "--output", str(out), "--json", *extra])
    return code, out


def test_group_size_against_every_width(capsys, tmp_path, tiny_model_dir, text_file, no_work):
    code, out = run(tmp_path, tiny_model_dir, text_file, "--format", "compressed-tensors", "--sym", "--group-size", "48")
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert "does not divide the input width 64" in err and "group sizes that divide 64 and 128: 64, 32, 16, or -1" in err


@pytest.mark.parametrize("extra", [("--format", "compressed-tensors", "--sym", "--group-size", "32"),
                                   ("--bits", "ternary", "--format", "sub1")])
def test_group_act_order_against_format(capsys, tmp_path, tiny_model_dir, text_file, no_work, extra):
    code, out = run(tmp_path, tiny_model_dir, text_file, "--act-order", "group", *extra)
    err = capsys.readouterr().err
    assert code == 2 and "--act-order static" in err and not out.exists()


def test_disk_space(capsys, tmp_path, tiny_model_dir, text_file, no_work, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(10**9, 10**9 - 1000, 1000))
    code, out = run(tmp_path, tiny_model_dir, text_file, "--bits", "4")
    err = capsys.readouterr().err
    assert code == 2 and "not enough free disk" in err and not out.exists()


def test_embed_group_against_width(capsys, tmp_path, tiny_model_dir, text_file, no_work):
    code, out = run(tmp_path, tiny_model_dir, text_file, "--embed-group-size", "48")
    assert code == 2 and "does not divide the embedding width 64" in capsys.readouterr().err and not out.exists()


def test_group_hint():
    assert group_hint([576, 1536]) == "64, 32, 16, or -1"
    assert group_hint([4096, 11008]) == "256, 128, 64, 32, 16, or -1"
    assert group_hint([100]) == "-1 (one group per row)"


def test_eval_budget_below_one_window_is_refused_before_loading(capsys, tmp_path, tiny_model_dir, text_file,
                                                               monkeypatch):
    from peakllm.calibrate import run as compression_run

    monkeypatch.setattr(compression_run, "load_model", lambda *a, **k: pytest.fail("loaded before the check"))
    code = main(["quantize", "--model", str(tiny_model_dir), "--eval-tokens", "256", "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "smaller than one evaluation window of 512" in err and not (tmp_path / "o").exists()
    code = main(["eval", "--model", str(tmp_path / "missing-but-not-read"), "--seqlen", "64", "--max-tokens", "32"])
    assert code == 2 and "smaller than one window of --seqlen 64" in capsys.readouterr().err
