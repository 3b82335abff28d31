"""Putting it together: a model folder → an `Engine` → the app → uvicorn (in this thread or another)."""

from __future__ import annotations

import threading
import time

import torch

from peakllm.errors import PeakError
from peakllm.models import load_model
from peakllm.runtime.adapter import attach_adapter
from peakllm.runtime.model import RuntimeModel
from peakllm.serve.engine import Engine
from peakllm.serve.runner import check_family, check_supported


def build_engine(model_arg: str, *, dtype: torch.dtype = torch.float32, max_model_len: int = 2048, adapter=None,
                 **engine_kwargs):
    """(engine, tokenizer) for `model_arg` as every command loads it (`default`, an HF folder, a packed
    peakllm folder, a .gguf); the engine is not started. adapter: a runtime.adapter.LoraAdapter run beside
    the linears, unmerged."""
    hf_model, tokenizer = load_model(model_arg)
    check_family(hf_model.config)  # before RuntimeModel, whose list is longer
    if adapter is not None:
        attach_adapter(hf_model, adapter)
    model = RuntimeModel.from_hf(hf_model, dtype, max_seq=max_model_len)
    check_supported(model)
    return Engine(model, tokenizer, max_model_len=max_model_len, **engine_kwargs), tokenizer


class ServerThread:
    """uvicorn serving `app` from a background thread (tests, the load test); `stop()` ends it."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="peakllm-http", daemon=True)

    def start(self, timeout_s: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise PeakError("the HTTP server did not start")
            time.sleep(0.02)
        return self

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
