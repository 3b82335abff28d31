"""PeakMoe: a Llama whose MLPs are top-k mixtures of experts (the architecture `peakllm moefy` writes).

Each decoder layer's MLP is a `PeakMoeBlock` laid out like the MoE blocks of transformers' Mixtral /
Qwen-MoE / OLMoE, so that one calibration pipeline and one compressed-expert runtime serve them all:
  mlp.gate     router: H -> E scores (a linear map, or a tiny 2-layer MLP when router_hidden > 0);
               forward returns (router_logits [T, E], top_k_weights [T, k], top_k_index [T, k])
  mlp.experts  fused 3-D parameters gate_up_proj [E, 2*I, H] (gate rows first, then up rows) and
               down_proj [E, H, I]; forward(hidden_states [T, H], top_k_index, top_k_weights) -> [T, H]
The experts of a MoEfied dense MLP partition its neurons, so the block's output is the plain SUM of the
selected experts' outputs: top_k_weights are all ones, and with k = E the block equals the dense MLP.

Importing this module registers model_type "peakllm_moe" with AutoConfig / AutoModelForCausalLM, so a
saved folder loads with `AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig
from transformers import initialization as init
from transformers.models.llama.modeling_llama import LlamaForCausalLM, LlamaModel, LlamaPreTrainedModel

# Qwen3-MoE's experts module reads exactly our field names (num_experts, moe_intermediate_size, hidden_act)
# and has the fused layout and forward signature of MixtralExperts, so it is reused as is.
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts as PeakMoeExperts

MODEL_TYPE = "peakllm_moe"


@strict
class PeakMoeConfig(LlamaConfig):
    """A LlamaConfig plus the MoE shape. `intermediate_size` stays the dense width = E * moe_intermediate_size."""

    model_type = MODEL_TYPE
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 1376
    router_hidden: int = 0  # 0 = linear router; > 0 = Linear(H, router_hidden) -> SiLU -> Linear(router_hidden, E)

    def validate_architecture(self):
        super().validate_architecture()
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be in 1..num_experts ({self.num_experts})")
        if self.moe_intermediate_size < 1 or self.router_hidden < 0:
            raise ValueError("moe_intermediate_size must be >= 1 and router_hidden >= 0")


class PeakMoeRouter(nn.Module):
    """Scores every expert from the MLP input and keeps the top k (weights 1: the experts are summed)."""

    def __init__(self, config: PeakMoeConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_experts
        self.hidden_dim = config.hidden_size
        self.router_hidden = config.router_hidden
        width = self.router_hidden or self.hidden_dim
        # Same name and shape as Mixtral's router weight when linear; a hidden layer only when asked for.
        self.hidden = nn.Linear(self.hidden_dim, self.router_hidden) if self.router_hidden else None
        self.weight = nn.Parameter(torch.empty(self.num_experts, width))
        self.bias = nn.Parameter(torch.zeros(self.num_experts))

    def scores(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.reshape(-1, self.hidden_dim)
        if self.hidden is not None:
            x = F.silu(self.hidden(x))
        return F.linear(x, self.weight, self.bias)

    def forward(self, hidden_states: torch.Tensor):
        router_logits = self.scores(hidden_states)
        top_k_index = torch.topk(router_logits, self.top_k, dim=-1).indices
        top_k_weights = torch.ones(top_k_index.shape, dtype=hidden_states.dtype, device=hidden_states.device)
        return router_logits, top_k_weights, top_k_index


class PeakMoeBlock(nn.Module):
    def __init__(self, config: PeakMoeConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_experts
        self.gate = PeakMoeRouter(config)
        self.experts = PeakMoeExperts(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        _, top_k_weights, top_k_index = self.gate(flat)
        return self.experts(flat, top_k_index, top_k_weights).reshape(shape)


class PeakMoePreTrainedModel(LlamaPreTrainedModel):
    config_class = PeakMoeConfig
    config: PeakMoeConfig

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, PeakMoeExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, PeakMoeRouter):
            init.normal_(module.weight, mean=0.0, std=std)
            init.zeros_(module.bias)


class PeakMoeModel(PeakMoePreTrainedModel, LlamaModel):
    def __init__(self, config: PeakMoeConfig):
        LlamaModel.__init__(self, config)
        for layer in self.layers:
            layer.mlp = PeakMoeBlock(config)
        # transformers initialises a sub-model's modules with that sub-model's _init_weights: run ours again.
        self.post_init()


class PeakMoeForCausalLM(PeakMoePreTrainedModel, LlamaForCausalLM):
    def __init__(self, config: PeakMoeConfig):
        LlamaPreTrainedModel.__init__(self, config)
        self.model = PeakMoeModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


def moe_blocks(model) -> list[PeakMoeBlock]:
    return [layer.mlp for layer in model.model.layers]


def set_top_k(model: PeakMoeForCausalLM, top_k: int) -> None:
    """Route every token to `top_k` experts from now on (the config follows, so save_pretrained keeps it)."""
    if not 1 <= top_k <= model.config.num_experts:
        raise ValueError(f"top_k must be in 1..{model.config.num_experts}, got {top_k}")
    model.config.num_experts_per_tok = top_k
    for block in moe_blocks(model):
        block.top_k = block.gate.top_k = top_k


def active_params_fraction(model: PeakMoeForCausalLM) -> float:
    """Parameters touched per token / all parameters (tied embedding counted once; k/E of every expert)."""
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for b in moe_blocks(model) for p in b.experts.parameters())
    return (total - expert * (1 - cfg.num_experts_per_tok / cfg.num_experts)) / total


def register() -> None:
    AutoConfig.register(MODEL_TYPE, PeakMoeConfig, exist_ok=True)
    AutoModelForCausalLM.register(PeakMoeConfig, PeakMoeForCausalLM, exist_ok=True)


register()
