"""Without a C++ compiler peakllm still runs, on its pure-torch paths, after a single one-line warning."""

import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.build, pytest.mark.subprocess]  # a fresh interpreter whose compiler is missing

SCRIPT = r"""
import torch, transformers as tf
from peakllm.runtime.generate import generate
from peakllm.runtime.model import RuntimeModel
from peakllm.runtime.linear import IntKLinear

torch.manual_seed(0)
hf = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()
mlp = hf.model.layers[0].mlp  # one packed layer too: its kernel is missing as well
mlp.down_proj = IntKLinear(128, 64, 4, 32, torch.randint(0, 256, (64, 64), dtype=torch.uint8),
                           (torch.rand(64, 4) * 0.02).half(), torch.full((64, 4), 8, dtype=torch.uint8))
rt = RuntimeModel.from_hf(hf)
ids = torch.tensor([[5, 17, 42]])
ours = generate(rt, None, ids, 8, stop_at_eos=False)
with torch.no_grad():
    ref = hf.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)[:, 3:]
assert torch.equal(ours, ref), (ours, ref)
print("OK", rt._step is None)
"""


def test_runs_on_torch_fallback_with_one_warning(tmp_path):
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), PEAKLLM_CACHE=str(tmp_path / "cache"),
               PYTHONWARNINGS="default")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["OK", "True"]  # no engine: every op ran on its torch reference
    warnings = [line for line in proc.stderr.splitlines() if "RuntimeWarning" in line]
    assert len(warnings) == 1 and "pure-torch path" in warnings[0], proc.stderr[-2000:]
