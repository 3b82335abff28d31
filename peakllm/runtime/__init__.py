"""Running packed models: `nn.Module`s that execute packed weights through the kernels, the lean decoder
(`model.py`, its layers in `layers.py`, per-family differences in `families.py`) with a static KV cache
and the whole-step C decode engine, sampling, the generation loop (with a transformers fallback), running
under a memory budget (`offload.py`, `pages.py`), and `bench`. The server (`serve/`) builds on it.
"""
