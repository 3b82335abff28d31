"""GGUF out: llama.cpp's block types as exact codes + parameters (``blocks.py``: pack to ggml's bytes, and a
dequantizer that equals ``gguf.quants.dequantize`` bit for bit), and the file writer with the metadata,
tensor names and tokenizer llama.cpp's own converter writes for each family (``writer.py``, ``families.py``,
``vocab.py``), the stored grids read back (``reader.py``), and any file of those families read into a transformers
model and tokenizer with the gguf library where transformers' own loader fails (``loader.py`` over ``file.py``). Solving onto these grids is
``peakllm/solvers/ggml.py``; this room knows only the bytes."""

from peakllm.formats.gguf.blocks import (BLOCK_TYPES, BlockType, GGMLWeight, block_type, check_width, fallback_type,
                                         unpack)
from peakllm.formats.gguf.reader import read_block_weights
from peakllm.formats.gguf.writer import GGUFStreamWriter, WrittenTensor, write_gguf

__all__ = ["BLOCK_TYPES", "BlockType", "GGMLWeight", "GGUFStreamWriter", "WrittenTensor", "block_type", "check_width",
           "fallback_type", "read_block_weights", "unpack", "write_gguf"]
