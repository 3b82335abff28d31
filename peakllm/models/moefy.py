"""MoEfication: turn a dense Llama's MLPs into top-k mixtures of experts, without training.

Zhang et al. 2022, "MoEfication: Transformer Feed-forward Layers are Mixtures of Experts". A feed-forward
layer y = W_down h, h = act(W_gate x) * (W_up x), is a sum over its I intermediate neurons; split the
neurons into E equal groups and it is exactly a sum of E small MLPs (experts). Only a few neurons matter
for a given token, so if the neurons that fire together share an expert, a router that picks k of the E
experts per token keeps most of the layer's output at k/E of its cost.

Steps, per layer, on calibration activations of the dense model:
1. `balanced_kmeans` groups neurons by their activation-magnitude pattern over calibration tokens.
2. `expert_weights` permutes gate/up rows and down columns into the fused experts layout.
3. `fit_router` learns to predict each expert's share of the layer output from the MLP input.

Why balanced k-means on |h| patterns rather than MoEfication's co-activation graph partition (METIS):
the paper's graph weights count how often two neurons are both positive, which suits ReLU models; in a
SwiGLU MLP h is dense and signed, so "active" is a matter of degree. The cosine similarity of two neurons'
|h| columns is the magnitude-weighted version of the same co-activation count, and k-means on unit-norm
columns maximises the within-expert co-activation it measures. Balancing (every expert gets exactly I/E
neurons, as the fused [E, 2I/E, H] layout requires) is done by a greedy assignment inside each k-means
step, which needs no graph-partitioning package.

Router target: the share s_e(t) = |y_e(t)| / sum_e' |y_e'(t)| of each expert's output norm, so every token
counts alike (the attention-sink token's huge activations would otherwise dominate a regression) and the
ranking the router must learn is unchanged. Linear routers are fitted in closed form (ridge least
squares); a router with a hidden layer is trained with Adam on the same squared error.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peakllm.data import calibration_segments
from peakllm.errors import PeakError
from peakllm.models.moe import PeakMoeConfig, PeakMoeForCausalLM
from peakllm.progress import tqdm

MAX_TOKENS_PER_LAYER = 4096  # calibration tokens kept per layer (a random subset) to bound memory


# ---------------------------------------------------------------------------------------------------------
# Math: pure functions on tensors.

def balanced_assign(sim: torch.Tensor, size: int) -> torch.Tensor:
    """Assign each row of sim [n, E] to one column, every column getting exactly `size` rows.

    Greedy: take (row, column) pairs in order of decreasing similarity, skipping full columns and rows
    already placed.
    """
    n, E = sim.shape
    if n != size * E:
        raise ValueError(f"{n} rows cannot fill {E} groups of {size}")
    order = torch.argsort(sim.flatten(), descending=True, stable=True).tolist()
    labels = [-1] * n
    counts = [0] * E
    placed = 0
    for flat in order:
        row, col = divmod(flat, E)
        if labels[row] < 0 and counts[col] < size:
            labels[row] = col
            counts[col] += 1
            placed += 1
            if placed == n:
                break
    return torch.tensor(labels, dtype=torch.long)


def balanced_kmeans(P: torch.Tensor, E: int, *, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """Spherical k-means of the rows of P [n, d] into E clusters of exactly n/E rows; returns labels [n]."""
    n = P.shape[0]
    P = F.normalize(P.float(), dim=1).contiguous()  # contiguous: a transposed view makes P @ C.T 3x slower
    gen = torch.Generator().manual_seed(seed)
    C = P[torch.randperm(n, generator=gen)[:E]]
    labels = None
    for _ in range(iters):
        new = balanced_assign(P @ C.T, n // E)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        C = F.normalize(F.one_hot(labels, E).T.float() @ P, dim=1)  # cluster sums; a matmul beats index_add_ here
    return labels


def expert_groups(labels: torch.Tensor, E: int) -> list[torch.Tensor]:
    """Neuron indices of each expert, ascending."""
    return [torch.nonzero(labels == e).flatten() for e in range(E)]


def expert_weights(W_gate, W_up, W_down, groups):
    """Dense SwiGLU weights [I, H], [I, H], [H, I] -> fused expert tensors gate_up [E, 2I/E, H], down [E, H, I/E]."""
    gate_up = torch.stack([torch.cat([W_gate[g], W_up[g]]) for g in groups])
    down = torch.stack([W_down[:, g] for g in groups])
    return gate_up, down


def expert_shares(h: torch.Tensor, W_down: torch.Tensor, groups) -> torch.Tensor:
    """Share of each expert in the layer's output norm, per token: h [T, I] -> [T, E], rows summing to 1."""
    norms = torch.stack([(h[:, g].float() @ W_down[:, g].T.float()).norm(dim=1) for g in groups], dim=1)
    return norms / norms.sum(dim=1, keepdim=True).clamp_min(1e-12)


def fit_router_lstsq(X: torch.Tensor, S: torch.Tensor, *, damp: float = 0.01):
    """Ridge least squares S ~ X W^T + b; X [T, H], S [T, E] -> (W [E, H], b [E]). damp is relative to mean(diag)."""
    Xb = torch.cat([X.double(), torch.ones(X.shape[0], 1, dtype=torch.float64)], dim=1)
    G = Xb.T @ Xb
    G.diagonal()[:-1] += damp * G.diagonal()[:-1].mean()  # the bias column is not damped
    Wb = torch.linalg.solve(G, Xb.T @ S.double())  # [H+1, E]
    return Wb[:-1].T.float().contiguous(), Wb[-1].float().contiguous()


def fit_router_adam(router, X: torch.Tensor, S: torch.Tensor, *, steps: int = 300, lr: float = 3e-3, seed: int = 0):
    """Train a router module (its `scores`) on squared error to the shares S, full batch."""
    torch.manual_seed(seed)
    for p in router.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=p.shape[1] ** -0.5)
        else:
            torch.nn.init.zeros_(p)
    opt = torch.optim.Adam(router.parameters(), lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            loss = F.mse_loss(router.scores(X), S)
            loss.backward()
            opt.step()


def kept_share(S: torch.Tensor, scores: torch.Tensor, k: int) -> float:
    """Mean over tokens of the output share held by the k experts with the highest router scores."""
    return S.gather(1, scores.topk(k, dim=1).indices).sum(dim=1).mean().item()


def kept_share_curve(S: torch.Tensor, scores: torch.Tensor) -> list[float]:
    """kept_share for every k = 1..E at once."""
    ranked = S.gather(1, scores.argsort(dim=1, descending=True, stable=True))
    return ranked.cumsum(dim=1).mean(dim=0).tolist()


# ---------------------------------------------------------------------------------------------------------
# Driver: checks, calibration hooks, building the MoE model.

def check_dense(model, experts: int, top_k: int) -> None:
    cfg = model.config
    if getattr(cfg, "model_type", None) != "llama":
        raise PeakError(f"moefy needs a Llama model (SwiGLU MLP with gate/up/down_proj); got '{getattr(cfg, 'model_type', None)}'")
    for layer in model.model.layers:
        mlp = layer.mlp
        projs = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
        if not all(isinstance(p, torch.nn.Linear) and p.bias is None for p in projs):
            raise PeakError("moefy needs plain bias-free gate_proj/up_proj/down_proj linear layers in every MLP")
    if experts < 1 or cfg.intermediate_size % experts:
        raise PeakError(f"--experts must be >= 1 and divide the MLP width {cfg.intermediate_size}; got {experts}")
    if not 1 <= top_k <= experts:
        raise PeakError(f"--top-k must be between 1 and --experts ({experts}); got {top_k}")


@torch.no_grad()
def collect_activations(model, segments: torch.Tensor, *, max_tokens: int, seed: int = 0, progress: bool = True):
    """Run the dense model over segments [n, L]; per layer return MLP inputs X [T, H] and down_proj inputs h [T, I].

    Only a random subset of at most max_tokens token positions (the same for every layer) is kept; h is kept
    in bf16 (wide range, half the memory), which is precise enough to rank neurons and experts.
    """
    n, L = segments.shape
    gen = torch.Generator().manual_seed(seed)
    keep = torch.zeros(n * L, dtype=torch.bool)
    keep[torch.randperm(n * L, generator=gen)[:max_tokens]] = True
    keep = keep.view(n, L)
    layers = model.model.layers
    X = [[] for _ in layers]
    A = [[] for _ in layers]
    rows = slice(0, 0)

    def grab(store, l, dtype):
        def hook(_module, args):
            store[l].append(args[0][keep[rows]].to(dtype))
        return hook

    handles = []
    for l, layer in enumerate(layers):
        handles.append(layer.mlp.register_forward_pre_hook(grab(X, l, torch.float32)))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(grab(A, l, torch.bfloat16)))
    try:
        batch = 4
        for start in tqdm(range(0, n, batch), desc="moefy: calibration", disable=not progress):
            rows = slice(start, min(start + batch, n))
            model(segments[rows])
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(x) for x in X], [torch.cat(a) for a in A]


def moe_config(dense_config, experts: int, top_k: int, router_hidden: int):
    fields = dense_config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "quantization_config", "dtype", "torch_dtype"):
        fields.pop(key, None)
    fields.update(num_experts=experts, num_experts_per_tok=top_k,
                  moe_intermediate_size=dense_config.intermediate_size // experts, router_hidden=router_hidden)
    return PeakMoeConfig(**fields)


@torch.no_grad()
def moefy(model, tokenizer, *, experts: int, top_k: int, calib_samples: int = 32, calib_seqlen: int = 256,
          calib_source: str = "calib", seed: int = 0, router_hidden: int = 0, router_steps: int = 300,
          max_tokens_per_layer: int = MAX_TOKENS_PER_LAYER, progress: bool = True):
    """Convert a dense Llama into a `PeakMoeForCausalLM` with `experts` experts per MLP, `top_k` active per token.

    The dense model is not modified. The result carries `moefy_stats` = {"kept_share": [per layer],
    "kept_share_by_k": [per layer: [k = 1..E]]}: the mean share of the dense MLP output norm held by the routed
    experts on the calibration tokens.
    """
    check_dense(model, experts, top_k)
    if router_hidden < 0:
        raise PeakError(f"--router-hidden must be >= 0, got {router_hidden}")
    segments = calibration_segments(tokenizer, calib_samples, calib_seqlen, source=calib_source, seed=seed)
    X, A = collect_activations(model, segments, max_tokens=max_tokens_per_layer, seed=seed, progress=progress)
    return build_moe(model, X, A, experts=experts, top_k=top_k, seed=seed, router_hidden=router_hidden,
                     router_steps=router_steps, progress=progress)


@torch.no_grad()
def build_moe(model, X, A, *, experts: int, top_k: int, seed: int = 0, router_hidden: int = 0,
              router_steps: int = 300, progress: bool = True):
    """The MoE model from the dense one and its calibration activations (from `collect_activations`).

    X and A are only read, so one calibration pass can serve several (experts, top_k); the router is fitted to
    predict shares, not a top-k set, so it does not depend on top_k (see `set_top_k`).
    """
    check_dense(model, experts, top_k)
    from transformers.initialization import no_init_weights

    torch.manual_seed(seed)
    with no_init_weights():  # every parameter is overwritten below; random init of 100M+ weights costs seconds
        moe = PeakMoeForCausalLM(moe_config(model.config, experts, top_k, router_hidden)).eval()
    dense_state = {k: v for k, v in model.state_dict().items() if ".mlp." not in k}
    missing, unexpected = moe.load_state_dict(dense_state, strict=False)
    if unexpected or any(".mlp." not in k for k in missing if k != "lm_head.weight") or (
            "lm_head.weight" in missing and not model.config.tie_word_embeddings):
        raise PeakError(f"the dense model's weights do not fit the MoE layout: {(unexpected or missing)[:3]}")
    moe.tie_weights()

    kept, oracle = [], []
    for l, layer in enumerate(tqdm(model.model.layers, desc="moefy: layers", disable=not progress)):
        mlp, block = layer.mlp, moe.model.layers[l].mlp
        W_gate, W_up, W_down = (p.weight.float() for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
        h = A[l]
        labels = balanced_kmeans(h.float().abs().T, experts, seed=seed + l)
        groups = expert_groups(labels, experts)
        gate_up, down = expert_weights(W_gate, W_up, W_down, groups)
        block.experts.gate_up_proj.copy_(gate_up)
        block.experts.down_proj.copy_(down)
        S = expert_shares(h, W_down, groups)
        if router_hidden:
            fit_router_adam(block.gate, X[l], S, steps=router_steps, seed=seed + l)
        else:
            W, b = fit_router_lstsq(X[l], S)
            block.gate.weight.copy_(W)
            block.gate.bias.copy_(b)
        kept.append(kept_share_curve(S, block.gate.scores(X[l])))
        oracle.append(kept_share_curve(S, S))
    moe = moe.to(next(model.parameters()).dtype)
    # per layer: share of the MLP output norm held by the routed experts (at top_k, and for every k = 1..E)
    moe.moefy_stats = {"kept_share": [curve[top_k - 1] for curve in kept], "kept_share_by_k": kept,
                       "oracle_share_by_k": oracle}
    return moe
