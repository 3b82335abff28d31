"""peakllm plan: exact output sizes from shapes, the recommended plan's --run equal to its command line, the
limits honoured, bad limits one clear error. The machine probe is replaced by fixed rates (its own test
measures a small one)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from peakllm.cli import main
from peakllm.plan import probe as probe_mod
from peakllm.plan.probe import Probe

RATES = Probe(machine="test", intk_gb_s={"2": 2.0, "3": 2.0, "4": 8.0, "8": 8.0}, matmul_gflop_s=50.0,
              rtn_weights_per_s=5e7, disk_gb_s=1.0, seconds=0.0)


@pytest.fixture
def fixed_probe(monkeypatch):
    monkeypatch.setattr(probe_mod, "probe", lambda refresh=False: RATES)


def _plan(capsys, model, *extra) -> dict:
    assert main(["plan", "--model", str(model), "--eval-tokens", "0", "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def _tensor_bytes(folder: Path) -> int:
    total = 0
    for f in folder.glob("*.safetensors"):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
    return total


def _files(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_run_equals_the_command_line_and_sizes_are_exact(capsys, fixed_probe, tmp_path, tiny_model_dir):
    plan = _plan(capsys, tiny_model_dir, "--goal", "size", "--calib-samples", "2", "--calib-seqlen", "32")
    best = plan["recommended"]
    assert plan["plans"][0] == best and (best["method"], best["bits"]) == ("gptq", 2)  # smallest; GPTQ at a tie
    argv = [a if a != "OUT" else str(tmp_path / "by-hand") for a in plan["command_line"][1:]]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["plan", "--model", str(tiny_model_dir), "--eval-tokens", "0", "--goal", "size", "--calib-samples",
                 "2", "--calib-seqlen", "32", "--run", "--output", str(tmp_path / "by-plan")]) == 0
    assert _files(tmp_path / "by-plan") == _files(tmp_path / "by-hand")
    assert _tensor_bytes(tmp_path / "by-hand") == best["weight_bytes"]


@pytest.mark.parametrize("bits", [8, 3])
def test_weight_bytes_exact_for_other_widths(capsys, fixed_probe, tmp_path, tiny_model_dir, text_file, bits):
    plan = _plan(capsys, tiny_model_dir)
    predicted = next(p for p in plan["plans"] if p["method"] == "rtn" and p["bits"] == bits)["weight_bytes"]
    assert main(["quantize", "--model", str(tiny_model_dir), "--method", "rtn", "--bits", str(bits), "--group-size",
                 "128", "--calib-dataset", str(text_file), "--eval-tokens", "0", "--output", str(tmp_path / "o")]) == 0
    assert _tensor_bytes(tmp_path / "o") == predicted


def test_limits_filter_and_order(capsys, fixed_probe, tiny_model_dir):
    plan = _plan(capsys, tiny_model_dir, "--max-bits", "4")
    assert (plan["recommended"]["method"], plan["recommended"]["bits"]) == ("gptq", 4)
    assert all(not p["fits"] for p in plan["plans"] if p["bits"] > 4)
    small = _plan(capsys, tiny_model_dir, "--memory", "1MB")
    assert not small["recommended"]["fits"] and "nothing fits" in small["why"]
    speed = _plan(capsys, tiny_model_dir, "--goal", "speed")
    rates = [p["decode_tok_s"] for p in speed["plans"]]
    assert rates == sorted(rates, reverse=True)


@pytest.mark.parametrize("bad", [["--memory", "lots"], ["--disk=-1GB"], ["--run"], ["--calib-samples", "0"]])
def test_bad_limits_are_one_clear_error(capsys, bad):
    assert main(["plan", "--model", "default", *bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("peakllm plan: error:")


def test_probe_measures_and_caches(monkeypatch, tmp_path):
    monkeypatch.setenv("PEAKLLM_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(probe_mod, "measure", lambda: calls.append(1) or RATES)
    first = probe_mod.probe()
    again = probe_mod.probe()
    assert calls == [1] and first == again
    probe_mod.probe(refresh=True)
    assert calls == [1, 1]
    assert probe_mod.matmul_rate(n=128, repeats=1) > 0 and probe_mod.rtn_rate(repeats=1) > 0
