"""Candidate plans for one model under the user's limits, each with its costs, and the recommended one first.

A plan is a `peakllm quantize` command line (method, bits, group size, format) and how its output runs (in
memory, or layers streamed under `--max-memory`). Its costs come from the model's meta skeleton and the
machine's probe (probe.py), before any work:
- output size: exact tensor bytes from the shapes and the format (sizes.py), plus the small files beside them;
- compression peak RSS: the planner the runs themselves use (calibrate/memory_plan.py, run_streamed.plan_memory),
  which also says whether the run streams;
- compression minutes: FLOPs (forwards, Hessians, GPTQ's solves, evaluation) over the probed matmul rate,
  RTN's weights over its probed rate, the input read at the probed disk rate;
- decode tok/s: bytes read per token over the int-k kernel's probed rate at that width; offloaded layers'
  bytes over the disk rate;
- quality: the change of log perplexity quality.py predicts from each plan's layer-wise losses on a few
  calibration segments (`--goal quality` orders by it; without the probe, by bits, GPTQ before RTN).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from peakllm.calibrate.memory_plan import plan_in_memory
from peakllm.calibrate.preflight import matrix_shapes
from peakllm.calibrate.quality_probe import Setting
from peakllm.calibrate.recipes import QuantRecipe
from peakllm.calibrate.run_streamed import plan_memory
from peakllm.calibrate.spec import RunSpec
from peakllm.errors import PeakError
from peakllm.models.anatomy import decoder_layers, is_moe
from peakllm.models.stream import StreamedModel
from peakllm.plan.probe import Probe
from peakllm.plan.quality import QualityProbe
from peakllm.plan.sizes import read_per_token, weight_bytes
from peakllm.solvers import Grid

GOALS = ("quality", "speed", "size")
CANDIDATES = [(m, b) for b in (8, 4, 3, 2) for m in ("gptq", "rtn")]
GROUP, EMBED_BITS, EMBED_GROUP = 128, 8, 64
SIDE_FILES_BYTES = 64 << 10      # config, manifest, header, run record; the tokenizer's files are counted
RUNTIME_BASE_BYTES = 450 << 20   # the runtime process before its weights (bench's base_rss_bytes: ~0.40-0.45 GB)


@dataclass(frozen=True)
class PlanSpec:
    """What `peakllm plan` is asked (cli/plan_cmd.py builds it at the door)."""
    model: str
    memory_bytes: int | None = None
    disk_bytes: int | None = None
    goal: str = "quality"
    max_bits: int | None = None
    calib_samples: int = 32          # the quantize command's defaults: what --run will do
    calib_seqlen: int = 512
    eval_tokens: int = 4096
    quality: bool = True             # run the quality probe (loads the model's weights)
    quality_samples: int = 4         # its calibration segments (of quality_seqlen tokens) and the layers it scores
    quality_layers: int | None = 3
    quality_seqlen: int = 128


@dataclass
class Plan:
    method: str
    bits: int
    group_size: int = GROUP
    format: str = "peakllm"
    runtime: str = "in memory"
    output_bytes: int = 0
    weight_bytes: int = 0
    compression_streamed: bool = False
    compression_peak_bytes: int | None = None
    compression_minutes: float | None = None
    decode_tok_s: float | None = None
    quality_score: float | None = None        # sum of the matrices' relative layer-wise losses (quality.py)
    predicted_dlog_ppl: float | None = None   # k * quality_score
    predicted_ppl_ratio: float | None = None  # exp(predicted_dlog_ppl): compressed ppl over dense ppl
    fits: bool = True
    why_not: list = field(default_factory=list)

    @property
    def setting(self) -> Setting:
        return Setting(self.method, Grid(bits=self.bits, group_size=self.group_size))

    def argv(self, spec: PlanSpec, output: str) -> list[str]:
        """The `peakllm quantize` arguments this plan is (what --run executes)."""
        args = ["quantize", "--model", spec.model, "--method", self.method, "--bits", str(self.bits),
                "--group-size", str(self.group_size), "--format", self.format, "--embed-bits", str(EMBED_BITS),
                "--calib-samples", str(spec.calib_samples), "--calib-seqlen", str(spec.calib_seqlen),
                "--eval-tokens", str(spec.eval_tokens), "--output", output]
        if spec.memory_bytes is not None:
            args += ["--max-memory", str(spec.memory_bytes)]
        return args

    def row(self) -> dict:
        return asdict(self)


def run_spec(spec: PlanSpec, plan: Plan) -> tuple[RunSpec, QuantRecipe]:
    """The run a plan's command line describes, as compress_common.run_spec and quantize_cmd build it."""
    grid = Grid(bits=plan.bits, group_size=plan.group_size)
    recipe = QuantRecipe(plan.method, grid, act_order="static" if plan.method == "gptq" else "none")
    run = RunSpec(command="quantize", model=spec.model, output=Path("plan"), format=plan.format,
                  calib_samples=spec.calib_samples, calib_seqlen=spec.calib_seqlen, eval_tokens=spec.eval_tokens,
                  embed_grid=Grid(bits=EMBED_BITS, group_size=EMBED_GROUP, sym=True), stream="auto",
                  max_memory_bytes=spec.memory_bytes)
    return run, recipe


def compression_peak(sm, spec: PlanSpec, plan: Plan) -> None:
    run, recipe = run_spec(spec, plan)
    mem = plan_in_memory(sm.model, run, recipe, source_bytes=sm.bytes_on_disk())
    if mem.fits:
        plan.compression_peak_bytes = mem.prediction["predicted_peak_bytes"]
        return
    plan.compression_streamed = True
    try:
        plan.compression_peak_bytes = plan_memory(sm, run, recipe).prediction["predicted_peak_bytes"]
    except PeakError as exc:  # not even streamed: the budget's refusal, its first line
        plan.fits = False
        plan.why_not.append(str(exc).splitlines()[0])


def compression_minutes(sm, spec: PlanSpec, plan: Plan, probe: Probe) -> float:
    """Reading the input, RTN's grid fits and codes, and the FLOPs of the evaluations (dense and compressed)
    and of GPTQ (capture, a forward per group of a layer and its output: ~5 passes; a Hessian per input,
    about one for every two matrices; each matrix's Cholesky inverse and sweep) over the probed rates."""
    shapes, compressed = matrix_shapes(sm.model)
    params = sum(p.numel() for p in sm.model.parameters())
    flops = 2 * 2 * params * spec.eval_tokens
    seconds = sm.bytes_on_disk() / (probe.disk_gb_s * 1e9) + compressed / probe.rtn_weights_per_s
    if plan.method == "gptq":
        tokens = spec.calib_samples * spec.calib_seqlen
        flops += 5 * 2 * compressed * tokens
        flops += sum(tokens * in_f ** 2 + 2 * in_f ** 3 + 2 * out_f * in_f ** 2 for out_f, in_f in shapes.values())
    return (seconds + flops / (probe.matmul_gflop_s * 1e9)) / 60


def decode_speed(sm, spec: PlanSpec, plan: Plan, probe: Probe) -> None:
    model = sm.model
    sizes = weight_bytes(model, bits=plan.bits, group_size=plan.group_size, embed_bits=EMBED_BITS,
                         embed_group_size=EMBED_GROUP)
    plan.weight_bytes = sizes["total"]
    plan.output_bytes = sizes["total"] + SIDE_FILES_BYTES + sum(
        f.stat().st_size for f in Path(sm.folder).glob("tokenizer*"))
    rate = probe.intk_gb_s[str(plan.bits)] * 1e9
    head_rate = probe.intk_gb_s[str(EMBED_BITS)] * 1e9
    per_token = read_per_token(model, sizes)
    step = sizes["decoder"] / rate + (per_token - sizes["decoder"]) / head_rate
    if spec.memory_bytes is not None and RUNTIME_BASE_BYTES + sizes["total"] > spec.memory_bytes:
        layers, _ = decoder_layers(model)
        layer = sizes["decoder"] / max(1, len(layers))
        resident = max(0, spec.memory_bytes - RUNTIME_BASE_BYTES - sizes["outer"] - sizes["dense"] - 2 * layer)
        streamed = max(0, sizes["decoder"] - resident)
        plan.runtime = f"offload (--max-memory {spec.memory_bytes}; {streamed / max(1, layer):.0f} layers streamed)"
        step += streamed / (probe.disk_gb_s * 1e9)
    plan.decode_tok_s = 1 / step


def candidate_settings() -> list[Setting]:
    """What the quality probe scores: every candidate plan's method and grid."""
    return [Plan(method, bits).setting for method, bits in CANDIDATES]


def candidate_plans(spec: PlanSpec, probe: Probe, quality: QualityProbe | None = None) -> list[Plan]:
    """Every candidate with its costs (and predicted quality, given the probe's), the recommended one first,
    then the others that fit, then the rest."""
    if spec.goal not in GOALS:
        raise PeakError(f"--goal must be one of {', '.join(GOALS)}, got {spec.goal!r}")
    try:
        sm = StreamedModel.open(spec.model)  # the meta skeleton: shapes, no weights
    except PeakError as exc:
        raise PeakError(f"plan reads the shapes of a Hugging Face safetensors folder or a built-in model: "
                        f"{str(exc).splitlines()[0]}") from None
    if is_moe(sm.model):
        raise PeakError("plan costs dense models only: a MoE's experts (routed, cached) are not modelled yet")
    plans = []
    for method, bits in CANDIDATES:
        plan = Plan(method, bits)
        if spec.max_bits is not None and bits > spec.max_bits:
            plan.fits = False
            plan.why_not.append(f"over --max-bits {spec.max_bits}")
        decode_speed(sm, spec, plan, probe)
        compression_peak(sm, spec, plan)
        plan.compression_minutes = compression_minutes(sm, spec, plan, probe)
        if quality is not None:
            plan.quality_score = quality.scores[plan.setting]
            plan.predicted_dlog_ppl = quality.predicted_dlog_ppl(plan.setting)
            plan.predicted_ppl_ratio = math.exp(plan.predicted_dlog_ppl)
        if spec.disk_bytes is not None and plan.output_bytes > spec.disk_bytes:
            plan.fits = False
            plan.why_not.append(f"output {plan.output_bytes} bytes over --disk {spec.disk_bytes}")
        plans.append(plan)
    return sorted(plans, key=lambda p: (not p.fits, order_key(spec.goal, p)))


def order_key(goal: str, plan: Plan) -> tuple:
    if goal == "speed":
        return (-(plan.decode_tok_s or 0), -plan.bits)
    if goal == "size":
        return (plan.output_bytes, plan.method != "gptq")
    if plan.quality_score is not None:
        return (plan.quality_score, -(plan.decode_tok_s or 0))
    return (-plan.bits, plan.method != "gptq", -(plan.decode_tok_s or 0))


def why(spec: PlanSpec, plan: Plan) -> str:
    limits = ", ".join(s for s in (f"--memory {spec.memory_bytes}" if spec.memory_bytes else "",
                                   f"--disk {spec.disk_bytes}" if spec.disk_bytes else "",
                                   f"--max-bits {spec.max_bits}" if spec.max_bits else "") if s) or "no limits given"
    if not plan.fits:
        return f"nothing fits ({limits}): " + "; ".join(plan.why_not)
    quality = ("the least predicted perplexity change (each matrix's output error at the plan's setting, measured "
               "with its solver on a few calibration segments)" if plan.quality_score is not None else
               "the most bits that fit, GPTQ before RTN at equal bits (it minimises each layer's output error on "
               "calibration data; RTN rounds each weight alone); quality not predicted (--no-quality)")
    reason = {"quality": quality,
              "speed": "the highest predicted decode tok/s",
              "size": "the smallest output"}[spec.goal]
    return f"goal {spec.goal} ({limits}): {reason}"
