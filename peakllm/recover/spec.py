"""The typed description of one recovery run, built by the CLI at the door (cli/recover_cmd.py) and handed to
`recover.run.recover`; nothing below it reads argparse's namespace."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from peakllm.errors import PeakError

METHODS = ("lora", "lomo", "adamw")  # adamw: full fine-tuning with AdamW, LOMO's memory baseline
EVAL_SETS = ("wiki", "shakespeare", "bible")


@dataclass(frozen=True)
class RecoverSpec:
    model: str                          # the compressed model: an HF folder, a peakllm folder, a .gguf file
    output: Path
    method: str = "lora"
    teacher: str | None = None          # None: the model the compressed folder records as its source
    overwrite: bool = False
    # how long
    steps: int | None = None
    minutes: float | None = None
    # data and objective
    train_dataset: str = "calib"
    train_samples: int = 256            # calibration segments drawn once; the steps cycle through them
    seqlen: int = 256
    batch_size: int = 4
    seed: int = 0
    alpha: float = 0.5                  # weight of the KL term; 1 - alpha on the next-token loss
    temperature: float = 2.0
    lr: float | None = None             # None: the method's default (DEFAULT_LR)
    warmup_steps: int = 10
    bos: bool = True
    # LoRA
    rank: int = 16
    lora_alpha: float = 32.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    merge: bool = False
    # checkpoints
    checkpoint_every: int = 50
    resume: bool = False
    # evaluation before and after
    eval_tokens: int = 4096
    eval_sets: tuple[str, ...] = EVAL_SETS
    eval_seqlen: int = 512
    progress: bool = True
    threads: int | None = None
    extra: dict = field(default_factory=dict)  # free-form notes recorded with the output

    def __post_init__(self):
        check_spec(self)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.output).with_name(Path(self.output).name + ".recover-ckpt")

    def resume_key(self) -> dict:
        """What must not change between a run and its --resume (the result would differ)."""
        keep = ("model", "method", "teacher", "steps", "minutes", "train_dataset", "train_samples", "seqlen",
                "batch_size", "seed", "alpha", "temperature", "warmup_steps", "bos", "rank", "lora_alpha",
                "target_modules", "checkpoint_every", "threads")
        d = asdict(self)
        return {k: (list(d[k]) if isinstance(d[k], tuple) else d[k]) for k in keep} | {"lr": self.learning_rate}

    def run_info(self) -> dict:
        """What the output records of how it was made."""
        d = {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
             for k, v in asdict(self).items() if k not in ("progress", "overwrite", "resume", "extra")}
        return {"command": "recover", **d, "lr": self.learning_rate, **self.extra}


DEFAULT_LR = {"lora": 5e-4, "lomo": 1e-2, "adamw": 2e-5}


def check_spec(s: RecoverSpec) -> None:
    """Every argument error as one PeakError, before anything is loaded."""
    if s.method not in METHODS:
        raise PeakError(f"--method must be one of {', '.join(METHODS)}, got {s.method!r}")
    if s.steps is None and s.minutes is None:
        raise PeakError("say how long to train: --steps N or --minutes M (or both: whichever comes first)")
    if s.steps is not None and s.steps < 1:
        raise PeakError(f"--steps must be >= 1, got {s.steps}")
    if s.minutes is not None and not s.minutes > 0:
        raise PeakError(f"--minutes must be > 0, got {s.minutes}")
    positive = {"--seqlen": s.seqlen - 1, "--batch-size": s.batch_size, "--train-samples": s.train_samples,
                "--rank": s.rank, "--checkpoint-every": s.checkpoint_every, "--eval-seqlen": s.eval_seqlen - 1}
    for name, value in positive.items():
        if value < 1:
            raise PeakError(f"{name} is too small ({name} {value + (1 if 'seqlen' in name else 0)})")
    if s.batch_size > s.train_samples:
        raise PeakError(f"--batch-size ({s.batch_size}) is larger than --train-samples ({s.train_samples})")
    if not 0.0 <= s.alpha <= 1.0:
        raise PeakError(f"--alpha (the KL weight) must be in [0, 1], got {s.alpha}")
    if not s.temperature > 0:
        raise PeakError(f"--temperature must be > 0, got {s.temperature}")
    if s.lr is not None and not s.lr > 0:
        raise PeakError(f"--lr must be > 0, got {s.lr}")
    if s.warmup_steps < 0 or s.eval_tokens < 0:
        raise PeakError("--warmup-steps and --eval-tokens must be >= 0")
    if 0 < s.eval_tokens < s.eval_seqlen:
        raise PeakError(f"--eval-tokens ({s.eval_tokens}) is smaller than one window of {s.eval_seqlen} tokens")
    if s.merge and s.method != "lora":
        raise PeakError(f"--merge folds a LoRA adapter into the model; --method {s.method} already writes the whole model")
    if not s.target_modules:
        raise PeakError("--target-modules is empty")
    if s.threads is not None and s.threads < 1:
        raise PeakError(f"--threads must be >= 1, got {s.threads}")
