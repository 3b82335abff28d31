"""The peakllm folder: round trip, atomic writes, sizes, bits_per_param by hand, plug-in kinds, and a loader
that answers every corruption (fuzzed with hypothesis) with PeakError and nothing else."""

import json
import random
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peakllm.errors import PeakError
from peakllm.formats import container
from peakllm.formats.container import bits_per_param, load_model_folder, register_kind, save_model_folder
from peakllm.formats.intk import PackedIntK, PackedTernary
from peakllm.formats.sparse import PackedBitmask, PackedNM
from peakllm.solvers.grids import Grid
from peakllm.solvers.rtn import rtn


def gen(seed):
    return torch.Generator().manual_seed(seed)


def make_contents():
    W = torch.randn(6, 24, generator=gen(0))
    act_qw = rtn(W, Grid("affine", 4, 8, False))
    perm = torch.randperm(24, generator=gen(1))
    g_idx = torch.empty(24, dtype=torch.int32)
    g_idx[perm] = (torch.arange(24) // 8).to(torch.int32)
    act_qw.g_idx = g_idx  # act-order groups over the same codes/params
    mask = torch.rand(6, 24, generator=gen(2)) < 0.5
    nm_mask = (torch.arange(24) % 4 < 2).expand(6, 24).clone()
    embed = torch.randn(30, 8, generator=gen(3))
    dense = {"model.embed_tokens.weight": embed, "lm_head.weight": embed,  # tied: shared storage
             "model.norm.weight": torch.rand(8, generator=gen(4)).to(torch.bfloat16),
             "model.step": torch.tensor([7], dtype=torch.int64)}
    packed = {
        "layers.0.q": PackedIntK.from_quantized(act_qw),
        "layers.0.k": PackedIntK.from_quantized(rtn(W, Grid("affine", 3, -1, True))),
        "layers.0.t": PackedTernary.from_quantized(rtn(W, Grid("ternary", 2, 5, False))),
        "layers.0.b": PackedBitmask.pack(W, mask, rtn(W, Grid("affine", 2, 8, False))),
        "layers.0.bf": PackedBitmask.pack(W.to(torch.float16), mask),
        "layers.0.nm": PackedNM.pack(W, nm_mask, 2, 4),
        "layers.0.nmq": PackedNM.pack(W, nm_mask, 2, 4, rtn(W, Grid("affine", 3, 8, True))),
    }
    return {"model_type": "llama", "hidden_size": 8}, dense, packed


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    config, dense, packed = make_contents()
    out = tmp_path_factory.mktemp("container") / "model"
    save_model_folder(out, config=config, dense_tensors=dense, packed_modules=packed,
                      manifest={"method": "test", "calib_tokens": 1234})
    return out, config, dense, packed


def test_round_trip(saved):
    out, config, dense, packed = saved
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "peakllm.json"]
    assert json.loads((out / "config.json").read_text()) == config
    manifest, dense2, packed2 = load_model_folder(out)
    assert manifest["format"] == "peakllm" and manifest["version"] == 1 and manifest["calib_tokens"] == 1234
    assert manifest["modules"]["layers.0.q"]["kind"] == "intk"
    assert set(dense2) == set(dense)
    for k in dense:
        assert dense2[k].dtype == dense[k].dtype and torch.equal(dense2[k], dense[k])
    assert set(packed2) == set(packed)
    for k, mod in packed.items():
        assert type(packed2[k]) is type(mod)
        assert torch.equal(packed2[k].dequantize(), mod.dequantize())
    assert packed2["layers.0.q"].g_idx is not None
    assert packed2["layers.0.bf"].values.dtype == torch.float16


def test_loaded_tensors_are_views_of_a_private_map(saved, tmp_path):
    """Loading maps the file instead of reading it into memory, and a tensor written in place (a caller's
    in-place op) changes that process's copy of the page, never the file."""
    out = tmp_path / "model"
    shutil.copytree(saved[0], out)
    before = (out / "model.safetensors").read_bytes()
    _, dense2, _ = load_model_folder(out)
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert str((out / "model.safetensors").resolve()) in maps.read_text()
    embed = dense2["model.embed_tokens.weight"]
    embed.mul_(0)
    assert (out / "model.safetensors").read_bytes() == before
    _, again, _ = load_model_folder(out)
    assert torch.equal(again["model.embed_tokens.weight"], saved[2]["model.embed_tokens.weight"])


def test_safetensors_library_reads_our_file(saved):
    from safetensors import safe_open
    out, _, dense, packed = saved
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert torch.equal(f.get_tensor("model.norm.weight"), dense["model.norm.weight"])
        assert torch.equal(f.get_tensor("layers.0.q.g_idx"), packed["layers.0.q"].g_idx)
        assert json.loads(f.metadata()["peakllm"])["format"] == "peakllm"


def test_file_size_matches_nbytes(saved):
    out, _, dense, packed = saved
    raw = (out / "model.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    dense_bytes = sum(t.numel() * t.element_size() for t in dense.values())
    assert len(raw) == 8 + header_len + dense_bytes + sum(m.nbytes for m in packed.values())


def test_bits_per_param_by_hand():
    g = gen(11)
    codes = torch.randint(0, 16, (4, 32), generator=g, dtype=torch.uint8)
    scale = torch.rand(4, 2, generator=g).to(torch.float16).float() + 0.01
    zero = torch.randint(0, 16, (4, 2), generator=g).float()
    mod = PackedIntK.from_codes(codes, scale, zero, bits=4, group_size=16)
    entry = {"lin": {"kind": "intk",
                     "metadata": {"bits": 4, "group_size": 16, "in_features": 32, "out_features": 4,
                                  "sym": False, "version": 1},
                     "tensors": {"qweight": {"dtype": "U8", "shape": [4, 16]},
                                 "scales": {"dtype": "F16", "shape": [4, 2]},
                                 "zeros": {"dtype": "U8", "shape": [4, 2]}}}}
    meta_bytes = len(json.dumps(entry, sort_keys=True, separators=(",", ":")))
    # codes 4 bits each, scales 2 bytes and zeros 1 byte per group of 16, plus the manifest entry
    tensor_bits = 4 * 32 * 4 + 4 * 2 * 16 + 4 * 2 * 8
    assert tensor_bits / (4 * 32) == 5.5  # 4 bits of code + (16 + 8) / 16 bits of group params
    expected = (tensor_bits + meta_bytes * 8) / (4 * 32)
    assert bits_per_param({"lin": mod}) == pytest.approx(expected, rel=1e-12)
    # two such layers: the same per-parameter cost, each paying its own entry (its name is as long)
    twin = {"lin": mod, "lim": mod}
    assert bits_per_param(twin) == pytest.approx(expected, rel=1e-12)


def test_refuses_to_overwrite_then_replaces(tmp_path):
    config, dense, packed = make_contents()
    out = tmp_path / "m"
    out.mkdir()  # an empty dir is fine
    save_model_folder(out, config=config, dense_tensors=dense, packed_modules={}, manifest={})
    with pytest.raises(PeakError, match="not empty"):
        save_model_folder(out, config=config, dense_tensors=dense, packed_modules=packed, manifest={})
    assert load_model_folder(out)[2] == {}

    def extra(tmp_dir):
        (Path(tmp_dir) / "tokenizer.json").write_text("{}")
    save_model_folder(out, config=config, dense_tensors=dense, packed_modules=packed, manifest={},
                      extra_files=extra, overwrite=True)
    assert (out / "tokenizer.json").exists() and set(load_model_folder(out)[2]) == set(packed)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp or old folders left behind


def test_failed_write_leaves_nothing(tmp_path):
    config, dense, packed = make_contents()

    def boom(tmp_dir):
        raise RuntimeError("tokenizer failed")
    with pytest.raises(RuntimeError):
        save_model_folder(tmp_path / "m", config=config, dense_tensors=dense, packed_modules=packed,
                          manifest={}, extra_files=boom)
    assert list(tmp_path.iterdir()) == []


def test_name_collisions_rejected(tmp_path):
    config, dense, packed = make_contents()
    dense = dict(dense, **{"layers.0.q.qweight": torch.zeros(1)})
    with pytest.raises(PeakError, match="used twice"):
        save_model_folder(tmp_path / "m", config=config, dense_tensors=dense, packed_modules=packed, manifest={})


@dataclass
class Sub1Like:
    """A stand-in for another room's kind: the container only needs the protocol."""
    kind: ClassVar[str] = "test_codebook"
    codes: torch.Tensor
    note: str

    num_params = property(lambda self: self.codes.numel() * 8)
    nbytes = property(lambda self: self.codes.numel())

    def to_tensors(self, prefix=""):
        return {prefix + "codes": self.codes}

    def metadata(self):
        return {"note": self.note}

    def dequantize(self):
        return self.codes.float()

    @classmethod
    def from_tensors(cls, tensors, metadata, prefix=""):
        return cls(codes=tensors[prefix + "codes"], note=metadata["note"])  # KeyError if absent: not PeakError


def test_registered_kind_round_trips_and_is_guarded(tmp_path):
    register_kind(Sub1Like.kind, Sub1Like)
    register_kind(Sub1Like.kind, Sub1Like)  # idempotent
    with pytest.raises(PeakError, match="already registered"):
        register_kind(Sub1Like.kind, PackedIntK)
    mod = Sub1Like(torch.arange(10, dtype=torch.uint8), "hello")
    out = tmp_path / "m"
    save_model_folder(out, config={}, dense_tensors={}, packed_modules={"experts": mod}, manifest={})
    manifest, _, packed = load_model_folder(out)
    assert packed["experts"].note == "hello" and torch.equal(packed["experts"].codes, mod.codes)
    assert manifest["modules"]["experts"]["metadata"] == {"note": "hello"}
    # a plug-in that raises KeyError on bad metadata still surfaces as PeakError
    _edit_manifest(out, lambda m: m["modules"]["experts"].update(metadata={}))
    with pytest.raises(PeakError, match="corrupt"):
        load_model_folder(out)


def _rewrite(folder: Path, header: dict, manifest: dict, same_copy: bool = True):
    raw = (folder / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = dict(header)
    header["__metadata__"] = {"peakllm": json.dumps(manifest)}
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])
    if same_copy:
        (folder / "peakllm.json").write_text(json.dumps(manifest))


def _header(folder: Path):
    raw = (folder / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    return header, json.loads(header["__metadata__"]["peakllm"])


def _edit_manifest(folder: Path, edit):
    header, manifest = _header(folder)
    edit(manifest)
    _rewrite(folder, header, manifest)


@pytest.mark.parametrize("edit, match", [
    (lambda h, m: m.update(version=2), "version"),
    (lambda h, m: m.update(format="other"), "format"),
    (lambda h, m: m["modules"]["layers.0.q"].update(kind="nope"), "unknown packed module kind"),
    (lambda h, m: m["modules"]["layers.0.q"]["metadata"].update(bits=8), "qweight"),
    (lambda h, m: m["modules"]["layers.0.nm"]["metadata"].update(m=5), "divisible"),
    (lambda h, m: m["modules"]["layers.0.q"]["tensors"].pop("g_idx"), "not in the manifest"),
    (lambda h, m: m["dense"]["model.norm.weight"].update(dtype="F32"), "manifest says"),
    (lambda h, m: h["model.norm.weight"].update(shape=[4]), "data_offsets"),
    (lambda h, m: h["model.norm.weight"].update(dtype="F64"), "data_offsets"),
    (lambda h, m: h["model.norm.weight"].update(data_offsets=[0, 16]), "overlaps"),
    (lambda h, m: h.pop("model.step"), "not in the file|hole"),
])
def test_consistent_edits_still_caught(saved, tmp_path, edit, match):
    folder = tmp_path / "m"
    shutil.copytree(saved[0], folder)
    header, manifest = _header(folder)
    edit(header, manifest)
    _rewrite(folder, header, manifest)
    with pytest.raises(PeakError, match=match):
        load_model_folder(folder)


def test_truncation_and_copy_mismatch(saved, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(saved[0], folder)
    raw = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(raw[:-3])
    with pytest.raises(PeakError, match="cut short|data_offsets"):
        load_model_folder(folder)
    (folder / "model.safetensors").write_bytes(raw)
    copy = json.loads((folder / "peakllm.json").read_text())
    copy["calib_tokens"] = 99
    (folder / "peakllm.json").write_text(json.dumps(copy))
    with pytest.raises(PeakError, match="disagrees"):
        load_model_folder(folder)
    (folder / "peakllm.json").unlink()
    with pytest.raises(PeakError, match="missing"):
        load_model_folder(folder)
    with pytest.raises(PeakError, match="not a peakllm model folder"):
        load_model_folder(tmp_path / "nowhere")


# ---- fuzzing: only PeakError, or a load with the original shapes --------------------------------

def _load_and_check(folder: Path, saved, *, same_as_saved: bool):
    """Loading either raises PeakError or gives tensors whose shapes are the ones the manifest states (and,
    when nothing but bytes were disturbed, exactly the saved contents)."""
    _, _, dense, packed = saved
    try:
        manifest, dense2, packed2 = load_model_folder(folder)
    except PeakError:
        return "rejected"
    for k, t in dense2.items():
        assert list(t.shape) == manifest["dense"][k]["shape"]
    for k, mod in packed2.items():
        meta = manifest["modules"][k]["metadata"]
        assert tuple(mod.dequantize().shape) == (meta["out_features"], meta["in_features"])
    if same_as_saved:
        assert set(dense2) == set(dense) and set(packed2) == set(packed)
        assert all(torch.equal(dense2[k], dense[k]) for k in dense)
        assert all(torch.equal(packed2[k].dequantize(), packed[k].dequantize()) for k in packed)
    return "loaded"


FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(data=st.data())
def test_fuzz_flip_bytes(saved, data):
    raw = bytearray((saved[0] / "model.safetensors").read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    # half the flips land in the 8-byte length and the header, where the structure lives
    hi = data.draw(st.sampled_from([8 + n, len(raw)]))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, hi - 1))
        raw[pos] ^= data.draw(st.integers(1, 255))
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "m"
        shutil.copytree(saved[0], folder)
        (folder / "model.safetensors").write_bytes(bytes(raw))
        _load_and_check(folder, saved, same_as_saved=True)


@FUZZ
@given(cut=st.integers(0, 1 << 20))
def test_fuzz_truncate(saved, cut):
    raw = (saved[0] / "model.safetensors").read_bytes()
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "m"
        shutil.copytree(saved[0], folder)
        (folder / "model.safetensors").write_bytes(raw[: cut % len(raw)])
        assert _load_and_check(folder, saved, same_as_saved=True) == "rejected"


def _paths(obj, path=()):
    """Every node below the root: leaves and the objects and lists holding them."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else []
    out = [path] if path else []
    return out + [p for k, v in items for p in _paths(v, path + (k,))]


def _get(obj, path):
    for k in path:
        obj = obj[k]
    return obj


def _set(obj, path, value):
    _get(obj, path[:-1])[path[-1]] = value


REPLACEMENTS = st.one_of(st.integers(-3, 70), st.integers(-(1 << 70), 1 << 70), st.sampled_from(
    [0, 1, -1, 2 ** 31, 2 ** 63, 1.5, 4.0, float("nan"), "8", "", "intk", "F16", None, [], [1], {}, True]))


def _fuzz_edit(saved, data, numbers_only: bool):
    header, manifest = _header(saved[0])
    header.pop("__metadata__")
    target = manifest if data.draw(st.booleans()) else header
    paths = [p for p in _paths(target) if not numbers_only or type(_get(target, p)) is int]
    path = data.draw(st.sampled_from(paths))
    old = _get(target, path)
    near = [st.integers(-2, 2).map(lambda d: old + d)] if type(old) is int else []
    _set(target, path, data.draw(st.one_of(REPLACEMENTS, *near)))
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "m"
        shutil.copytree(saved[0], folder)
        _rewrite(folder, header, manifest)
        _load_and_check(folder, saved, same_as_saved=False)


@FUZZ
@given(data=st.data())
def test_fuzz_edit_numbers_consistently(saved, data):
    """Edit one number of the header or the manifest, keeping peakllm.json in step, so only the deeper
    checks (sizes, offsets, shapes, metadata ranges) can catch it."""
    _fuzz_edit(saved, data, numbers_only=True)


@FUZZ
@given(data=st.data())
def test_fuzz_edit_any_field_consistently(saved, data):
    """The same with any field or sub-object replaced by a value of another type."""
    _fuzz_edit(saved, data, numbers_only=False)


@FUZZ
@given(data=st.data())
def test_fuzz_flip_manifest_copy(saved, data):
    raw = bytearray((saved[0] / "peakllm.json").read_bytes())
    for _ in range(data.draw(st.integers(1, 3))):
        raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "m"
        shutil.copytree(saved[0], folder)
        (folder / "peakllm.json").write_bytes(bytes(raw))
        _load_and_check(folder, saved, same_as_saved=True)


def test_checksum_catches_data_flips_but_not_reformatting(saved, tmp_path):
    """A flipped bit in tensor data would decode to a different model: the checksum rejects it. The same
    header written with other JSON whitespace changes nothing and loads the saved contents."""
    raw = bytearray((saved[0] / "model.safetensors").read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    folder = tmp_path / "m"
    shutil.copytree(saved[0], folder)
    raw[8 + n + 5] ^= 0x01
    (folder / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(PeakError, match="checksum"):
        load_model_folder(folder)
    shutil.rmtree(folder)
    shutil.copytree(saved[0], folder)
    header = json.loads((folder / "model.safetensors").read_bytes()[8:8 + n])
    blob = json.dumps(header, indent=3).encode()
    blob += b" " * (-len(blob) % 8)
    body = (saved[0] / "model.safetensors").read_bytes()[8 + n:]
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + body)
    assert _load_and_check(folder, saved, same_as_saved=True) == "loaded"
