"""Packed weight formats and their bytes: int-k, ternary, bitmask and N:M sparse, sub-1-bit, the peakllm
folder, and compressed-tensors export. Layouts are fixed in docs/DESIGN.md "Packed layouts"."""

from peakllm.formats.bitpack import pack_bits, unpack_bits
from peakllm.formats.compressed_tensors import export_compressed_tensors
from peakllm.formats.container import bits_per_param, load_model_folder, register_kind, save_model_folder
from peakllm.formats.intk import PackedIntK, PackedTernary
from peakllm.formats.sparse import PackedBitmask, PackedNM
from peakllm.formats.tensor_file import read_safetensors

# Imported for its side effect: it registers the "sub1" kind with the container, so any loader sees it.
from peakllm.formats import sub1  # noqa: E402,F401

__all__ = [
    "PackedBitmask", "PackedIntK", "PackedNM", "PackedTernary", "bits_per_param", "export_compressed_tensors",
    "load_model_folder", "pack_bits", "read_safetensors", "register_kind", "save_model_folder", "unpack_bits",
]
