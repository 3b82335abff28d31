"""Packed weight formats and their bytes: int-k, ternary, bitmask and N:M sparse, the peakllm folder,
and compressed-tensors export. Layouts are fixed in docs/DESIGN.md "Packed layouts"."""

from peakllm.formats.bitpack import pack_bits, unpack_bits
from peakllm.formats.container import (
    bits_per_param, load_model_folder, read_safetensors, register_kind, save_model_folder,
)
from peakllm.formats.intk import PackedIntK, PackedTernary
from peakllm.formats.sparse import PackedBitmask, PackedNM

__all__ = [
    "PackedBitmask", "PackedIntK", "PackedNM", "PackedTernary", "bits_per_param", "load_model_folder",
    "pack_bits", "read_safetensors", "register_kind", "save_model_folder", "unpack_bits",
]
