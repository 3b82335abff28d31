"""ggml block types: our dequantizer equals gguf's on our packed bytes bit for bit, for random codes and
parameters of every type and odd row counts; unpack inverts pack; gguf's own quantizer's bytes (legacy types)
unpack and re-pack to the same bytes; widths a type cannot take are one error."""

import gguf
import numpy as np
import pytest
import torch

from peakllm.errors import PeakError
from peakllm.formats.gguf.blocks import BLOCK_TYPES, GGMLWeight, check_width, fallback_type, unpack


def random_weight(name: str, rows: int, n_blocks: int, seed: int = 0) -> GGMLWeight:
    t = BLOCK_TYPES[name]
    g = torch.Generator().manual_seed(seed)
    cols = t.block * n_blocks
    codes = torch.randint(0, 2**t.code_bits, (rows, cols), generator=g, dtype=torch.uint8)
    params = {}
    for key, (per, bounds) in t.params.items():
        n = cols // (t.block if per == "block" else t.group)
        if bounds is None:  # fp16 over many binades, both signs, with some exact zeros
            p = torch.randn(rows, n, generator=g) * torch.exp2(torch.randint(-14, 2, (rows, n), generator=g).float())
            p[torch.rand(rows, n, generator=g) < 0.1] = 0
            params[key] = p.half()
        else:
            params[key] = torch.randint(bounds[0], bounds[1] + 1, (rows, n), generator=g, dtype=torch.int16)
    return GGMLWeight(name, codes, params)


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.int32)


@pytest.mark.parametrize("name", list(BLOCK_TYPES))
@pytest.mark.parametrize("rows,n_blocks", [(1, 1), (5, 3), (7, 2)])
def test_dequantize_equals_gguf_bit_for_bit(name, rows, n_blocks):
    w = random_weight(name, rows, n_blocks, seed=rows * 10 + n_blocks)
    data = w.pack()
    t = BLOCK_TYPES[name]
    assert data.dtype == np.uint8 and data.shape == (rows, n_blocks * t.type_size)
    ours = w.dequantize()
    assert ours.dtype == torch.float32 and ours.shape == (rows, n_blocks * t.block)
    theirs = gguf.quants.dequantize(data, t.ggml)
    assert np.array_equal(bits(theirs), bits(ours.numpy()))
    back = unpack(name, data, (rows, n_blocks * t.block))
    assert torch.equal(back.codes, w.codes)
    assert all(torch.equal(back.params[k], w.params[k]) for k in w.params)
    assert np.array_equal(back.pack(), data)


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_gguf_quantizer_bytes_unpack_and_repack(name):
    """gguf's reference quantizer writes the layout too: what it writes, we read and re-pack unchanged."""
    x = np.random.default_rng(0).standard_normal((5, 96)).astype(np.float32)
    t = BLOCK_TYPES[name]
    data = gguf.quants.quantize(x, t.ggml)
    w = unpack(name, data, x.shape)
    assert np.array_equal(w.pack(), data)
    assert np.array_equal(bits(w.dequantize().numpy()), bits(gguf.quants.dequantize(data, t.ggml)))


def test_scale_bias_describe_the_grid():
    """Each weight is scale[group] * level + bias[group]: the form the solvers round onto."""
    for name, t in BLOCK_TYPES.items():
        w = random_weight(name, 3, 2, seed=1)
        scale, bias = w.scale_bias()
        assert scale.shape == (3, 2 * t.block // t.group)
        assert (bias is not None) == t.has_bias
        levels = t.levels()[w.codes.long()]
        expect = scale.repeat_interleave(t.group, 1) * levels
        if bias is not None:
            expect = expect + bias.repeat_interleave(t.group, 1)
        assert torch.equal(expect, w.dequantize())


@pytest.mark.parametrize("name,cols", [("Q4_0", 48), ("Q4_K", 288), ("Q6_K", 128), ("IQ4_NL", 16), ("Q8_0", 0)])
def test_width_a_type_cannot_take_is_one_error(name, cols):
    with pytest.raises(PeakError, match="blocks of"):
        check_width(name, cols)


def test_widths_and_fallbacks():
    assert check_width("Q4_K", 512).name == "Q4_K" and check_width("Q4_0", 96).name == "Q4_0"
    assert fallback_type("Q4_K", 576) == "Q5_0"   # 576 = 18 * 32
    assert fallback_type("Q6_K", 576) == "Q8_0"
    assert fallback_type("Q3_K", 576) == "Q4_0"
    assert fallback_type("Q4_K", 512) == "Q4_K"
    assert fallback_type("Q4_K", 100) == "F16"


def test_bad_type_codes_and_params_are_errors():
    with pytest.raises(PeakError, match="unknown GGUF block type"):
        check_width("Q4_Z", 32)
    w = random_weight("Q4_K", 2, 1)
    with pytest.raises(PeakError, match="codes must be uint8 below 16"):
        GGMLWeight("Q4_K", w.codes | 16, w.params)
    with pytest.raises(PeakError, match="integers in"):
        GGMLWeight("Q4_K", w.codes, {**w.params, "scales": w.params["scales"] + 64})
    with pytest.raises(PeakError, match="needs parameters"):
        GGMLWeight("Q4_K", w.codes, {"d": w.params["d"]})
    with pytest.raises(PeakError, match="needs 576 bytes"):
        unpack("Q4_K", np.zeros(575, np.uint8), (4, 256))
