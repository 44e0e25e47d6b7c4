"""One source of configuration: dataclasses for the model, the diffusion process,
training, LoRA and sampling, each validated where it is built (harness/cli.py turns their
fields into command-line flags).

Every checkpoint stores `asdict()` of these, so a model can always be rebuilt exactly.
"""
import math
from dataclasses import dataclass, fields

MAX_IMAGES = 100_000   # images per sampling request: 313 MB of float32 pixels, ~80 MB as uint8 in the npz
LORA_MAX_R = 4096      # the largest LoRA rank and alpha: what lora_finetune.py trains, harness/adapters.py's loader accepts
LORA_MAX_ALPHA = 1e6


@dataclass
class ModelConfig:
    """The UNet: Stable Diffusion's UNet in miniature, at MNIST's native 28x28."""
    in_channels: int = 1            # grey-scale digits
    base_channels: int = 16         # width of the first level
    channel_mults: tuple = (1, 2, 4)  # widths per level: 28x28, 14x14, 7x7 (narrow where it is costly)
    num_res_blocks: int = 1         # ResnetBlocks per level on the way down
    num_classes: int = 10           # digits 0..9; index num_classes is the "null" label
    context_tokens: int = 4         # L: tokens per label in the cross-attention context (>= 2)
    context_dim: int = 64           # width of each context token
    attn_heads: int = 4             # heads of the cross-attention
    ff_mult: int = 2                # hidden width of the feed-forward = ff_mult * channels
    dropout: float = 0.0

    def __post_init__(self):
        _check_types(self)
        _check(self.in_channels == 1, "in_channels must be 1: MNIST digits are grey-scale")
        _check(self.num_classes == 10, "num_classes must be 10: the digits 0..9")
        _check(0.0 <= self.dropout < 1.0, f"dropout {self.dropout}: must be in [0, 1)")
        _check(self.num_res_blocks >= 0, "num_res_blocks must be >= 0")
        _check(min(self.context_dim, self.ff_mult) > 0, "context_dim and ff_mult must be > 0")
        _check(max(self.base_channels, self.context_dim) <= 4096 and max(self.ff_mult, self.num_res_blocks) <= 16
               and self.context_tokens <= 256, "widths beyond 4096 (ff_mult, num_res_blocks beyond 16, "
               "context_tokens beyond 256) do not fit in memory")
        _check(self.attn_heads >= 1, "attn_heads must be >= 1")
        _check(self.context_tokens >= 2, "context_tokens must be >= 2: over one token the "
               "softmax is identically 1 and W_q, W_k never learn")
        _check(all(m > 0 for m in self.channel_mults) and self.base_channels > 0, "widths (base_channels, channel_mults) must be > 0")
        _check(self.base_channels % 8 == 0, "base_channels must be a multiple of 8 (GroupNorm groups)")
        _check(all(self.base_channels * m % self.attn_heads == 0 for m in self.channel_mults),
               "every level's width must be divisible by attn_heads")
        _check(1 <= len(self.channel_mults) <= 3 and max(self.channel_mults) <= 64,
               "channel_mults: 1 to 3 levels (28 -> 14 -> 7), multipliers up to 64")


@dataclass
class DiffusionConfig:
    """The noising process and how the network is trained to reverse it."""
    timesteps: int = 1000           # T
    schedule: str = "cosine"        # "cosine" (Nichol & Dhariwal) or "linear" (Ho et al.)
    prediction: str = "v"           # network target: "v" (velocity; no speckles, measured) or "eps"
    min_snr_gamma: float = 0.0      # > 0: Min-SNR loss weighting (Hang et al. 2023)
    p_uncond: float = 0.1           # label dropout for classifier-free guidance
    sample_guidance: float = 2.0    # the guidance scale w this model is sampled at unless --guidance says otherwise

    def __post_init__(self):
        _check_types(self)
        _check(2 <= self.timesteps <= 100_000, "timesteps must be between 2 and 100,000")
        _check(self.schedule in ("cosine", "linear"), f"unknown schedule {self.schedule!r}")
        _check(self.prediction in ("eps", "v"), f"unknown prediction {self.prediction!r}")
        _check(0.0 <= self.p_uncond < 1.0, "p_uncond must be in [0, 1)")
        _check(self.min_snr_gamma >= 0, "min_snr_gamma must be >= 0 (0 = off)")
        _check(0 <= self.sample_guidance <= 100, f"sample_guidance {self.sample_guidance}: must be between 0 and 100")
        _check(self.p_uncond > 0 or self.sample_guidance == 1, f"p_uncond 0 trains no unconditional model, which "
               f"guidance (--sample-guidance {self.sample_guidance:g}) pushes away from: add --sample-guidance 1 "
               "(no guidance), or keep --p-uncond above 0")


@dataclass
class TrainConfig:
    """The training loop. Counted in optimiser steps, so a run is the same work on any dataset."""
    dataset: str = "auto"           # auto | mnist | mnist-5k | folder
    data_dir: str = "data"          # where MNIST lives / is downloaded, or the folder dataset
    out: str = "runs/mnist"         # run folder: checkpoint, figures
    steps: int = 700                # optimiser steps: 700 x 32 = 22.4k images (measured; docs/training.md)
    epochs: int = 0                 # > 0: size the run in passes over the training set instead of steps
    max_steps: int = 0              # stop after this many steps (0 = the whole run; schedule unchanged)
    batch_size: int = 32            # twice the optimiser steps of 64 for the same images (measured better)
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0
    t_power: float = 2.0            # timesteps drawn with density ~ t^(k-1): 1 uniform (DDPM), 2 noisier (measured better)
    ema_decay: float = 0.99         # averages ~the last 100 of the run's 700 steps
    seed: int = 0
    device: str = "auto"            # auto | cpu | cuda | mps
    threads: int = 0                # CPU threads for torch (0 = torch's default)
    channels_last: bool = True      # NHWC memory layout: faster convolutions on CPU (measured)
    precision: str = "fp32"         # fp32 | bf16 (autocast: bfloat16 matmuls/convs, fp32 weights)
    compile: bool = False           # torch.compile the network (pays a compile time up front)
    sample_every: int = 0           # steps between sample grids (0 = only at the end)
    ckpt_every: int = 500           # steps between checkpoints
    log_every: int = 10             # steps between progress-bar updates of the loss
    eval_n: int = 20                # samples per digit for the final evaluation (0 = skip)
    eval_every: int = 0             # steps between quick evaluations of the EMA weights: the curve (0 = off)

    def __post_init__(self):
        _check_types(self)
        _check(self.threads <= 4096, "threads must be <= 4096")
        for name in ("steps", "batch_size", "ckpt_every", "log_every"):
            _check(getattr(self, name) > 0, f"{name} must be > 0")
        for name in ("epochs", "warmup_steps", "sample_every", "eval_n", "eval_every", "threads", "weight_decay",
                     "max_steps"):
            _check(getattr(self, name) >= 0, f"{name} must be >= 0")
        _check(self.lr > 0 and self.grad_clip > 0, "lr and grad_clip must be > 0")
        _check(self.t_power > 0, "t_power must be > 0 (1 = uniform timesteps)")
        _check(0.0 <= self.ema_decay < 1.0, "ema_decay must be in [0, 1)")
        _check(self.dataset in ("auto", "mnist", "mnist-5k", "folder"), f"unknown dataset {self.dataset!r}")
        _check(self.precision in ("fp32", "bf16"), f"unknown precision {self.precision!r} (fp32 or bf16)")
        _check(self.lr <= 1, f"lr {self.lr}: must be at most 1 (an AdamW step moves each weight by about lr; "
               "1e-4 .. 1e-2 is usual)")
        _check(self.weight_decay <= 1, f"weight_decay {self.weight_decay}: must be between 0 and 1 (AdamW shrinks "
               "the weights by lr * weight_decay each step; 0 .. 0.1 is usual)")
        _check(0 <= self.seed < 2 ** 63, f"seed {self.seed}: must be in 0 .. 2^63 - 1")
        _check(self.eval_n <= MAX_IMAGES // 10, f"eval_n {self.eval_n}: at most {MAX_IMAGES // 10:,} samples per "
               "digit (as evaluate.py's --n)")


@dataclass
class LoraConfig:
    """What lora_finetune.py adapts, and how."""
    style: str = "bold"             # bold | italic (built-in), or "folder" for --data-dir images
    targets: str = "qkv"            # qkv (the article's) | attn | attn+ff | all-linear | conv | attn+conv | all | regexes
    r: int = 4                      # rank of the update B A
    alpha: float = 4.0              # scaling = alpha / r
    lora_dropout: float = 0.0
    rslora: bool = False            # scaling = alpha / sqrt(r) instead
    lr_ratio_b: float = 1.0         # LoRA+ (Hayou et al. 2024): B learns this many times faster than A
    full: bool = False              # baseline: fine-tune every weight instead of LoRA
    style_dir: str = ""             # style "folder": your digits, in subfolders 0..9
    fused: bool = True              # run LoRA layers as x (W + dW)^T: the same numbers, one op instead of three
    export_peft: bool = False       # also write the adapter in peft's format (<out>/peft)

    def __post_init__(self):
        _check_types(self)
        _check(self.r >= 1, "r must be >= 1")
        _check(self.alpha > 0, "alpha must be > 0")
        _check(self.r <= LORA_MAX_R, f"r {self.r}: must be between 1 and {LORA_MAX_R} (what an adapter may hold)")
        _check(self.alpha <= LORA_MAX_ALPHA, f"alpha {self.alpha}: must be in (0, {LORA_MAX_ALPHA:g}] "
               "(what an adapter may hold)")
        _check(self.lr_ratio_b > 0, "lr_ratio_b must be > 0")
        _check(0.0 <= self.lora_dropout < 1.0, "lora_dropout must be in [0, 1)")
        _check(self.style in ("bold", "italic", "folder"), f"unknown style {self.style!r}")
        _check(self.style != "folder" or self.style_dir, "style folder needs --style-dir (subfolders 0..9 of your digits)")


SAMPLERS = ("ddim", "dpmpp", "ddpm")
DEFAULT_STEPS = {"ddim": 50, "dpmpp": 10}    # a sampler's steps unless --steps says (docs/sampling.md: How many steps)
MAX_JUMPS = 20                      # each jump costs one more network call per step


@dataclass
class SampleConfig:
    """How to draw digits from a trained model (sample.py, evaluate.py, training's figures)."""
    sampler: str = "ddim"           # ddim: few deterministic steps; dpmpp: DPM-Solver++(2M); ddpm: all T steps
    steps: int = 50                 # DDIM / DPM-Solver++ steps (ddpm uses all T)
    guidance: float = 2.0           # classifier-free guidance scale w; 1 = the plain conditional model
    eta: float = 0.0                # DDIM noise: 0 deterministic, 1 ~ DDPM
    guide_from: float = 0.0         # guidance only for guide_from <= t/T < guide_to (Kynkaanniemi et al. 2024);
    guide_to: float = 1.0           # the plain conditional model (w = 1) at the other steps
    guidance_rescale: float = 0.0   # phi: pull the guided output's spread back to the conditional one's (Lin et al. 2024)
    seed: int = 0
    negative: int = -1              # guide away from this label instead of from "no label" (-1: off)
    strength: float = 1.0           # img2img: noise the input image to t = strength (T - 1) (1: pure noise)
    jumps: int = 0                  # inpainting: times each step is undone and redone (RePaint)

    def __post_init__(self):
        _check_types(self)
        _check(self.sampler in SAMPLERS, f"unknown sampler {self.sampler!r} ({', '.join(SAMPLERS)})")
        _check(self.eta == 0 or self.sampler == "ddim", f"eta {self.eta}: only DDIM takes eta")
        _check(self.negative >= -1, f"negative label {self.negative}: must be a label (or -1 for none)")
        _check(0 < self.strength <= 1, f"strength {self.strength}: must be in (0, 1] (1 = from pure noise)")
        _check(0 <= self.jumps <= MAX_JUMPS, f"jumps {self.jumps}: must be between 0 and {MAX_JUMPS}")
        _check(self.steps >= 1, f"steps {self.steps}: must be >= 1")
        _check(0 <= self.guidance <= 100, f"guidance {self.guidance}: must be between 0 and 100 "
               "(beyond ~20 the samples only saturate)")
        _check(0 <= self.eta <= 1, f"eta {self.eta}: must be between 0 (deterministic DDIM) and 1")   # refuses nan
        _check(0 <= self.guide_from < self.guide_to <= 1, f"guidance interval {self.guide_from}..{self.guide_to}: "
               "need 0 <= guide_from < guide_to <= 1 (fractions of T)")
        _check(0 <= self.guidance_rescale <= 1, f"guidance_rescale {self.guidance_rescale}: must be in [0, 1]")
        _check(0 <= self.seed < 2 ** 63, f"seed {self.seed}: must be in 0 .. 2^63 - 1")

    def check_steps(self, timesteps):
        """The model's T bounds the number of DDIM / DPM-Solver++ steps (DDPM takes all T)."""
        _check(self.sampler == "ddpm" or self.steps <= timesteps,
               f"steps {self.steps}: must be between 1 and {timesteps} (the model's T)")


def _check(ok, message):
    if not ok:
        raise ValueError(message)


def _check_types(cfg):
    """Every field has its default's type (a config read from a tampered checkpoint is a clear
    error, not a crash deep in the model): ints are ints, floats finite numbers, tuples of ints."""
    for f in fields(cfg):
        v, kind = getattr(cfg, f.name), type(f.default)
        if kind is float:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        elif kind is int:
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif kind is tuple:
            ok = isinstance(v, tuple) and all(isinstance(m, int) and not isinstance(m, bool) for m in v)
        else:
            ok = isinstance(v, kind)
        _check(ok, f"{f.name} {v!r}: must be {'a finite number' if kind is float else 'of type ' + kind.__name__}")


# Named starting points for the flags; any flag given explicitly still wins.
PRESETS = {
    "cpu": {},   # the dataclass defaults: 700 steps of 32 digits, ~2 minutes on 2 CPU cores
    # the previous default: 94k images, ~4x the time; 100% accuracy, and a base on which the
    # conv r2 italic LoRA gets 84% (78% on the default)
    "long": {"steps": 1470, "batch_size": 64, "lr": 2e-3, "ema_decay": 0.995, "t_power": 1.0,
             "sample_guidance": 1.5},   # well trained: 99.2% at w 1.5 with more varied digits (100% at w 2)
    "gpu": {"base_channels": 64, "channel_mults": (1, 2, 2), "num_res_blocks": 2, "context_dim": 128,
            "ff_mult": 4, "batch_size": 256, "steps": 9360, "lr": 1e-3, "warmup_steps": 500,
            "ema_decay": 0.999, "t_power": 1.0, "ckpt_every": 2000, "eval_n": 100},   # 40 epochs of full MNIST, on a GPU
}


# lora_finetune.py's recipe per style; any flag given explicitly still wins, and --full (the
# baseline) keeps the plain defaults. Bold thickens a stroke and must keep its rim sharp: the rim
# is drawn by the 3x3 convolutions at low noise, so bold adapts every layer (the article's q, k, v
# among them) at r 8 and trains on uniform timesteps (docs/lora.md). Italic and a folder of your
# digits start from the article's form: LoraConfig's defaults (`qkv`, r 4).
STYLE_RECIPES = {
    "bold": {"targets": "all", "r": 8, "alpha": 8.0, "lr": 4e-3, "t_power": 1.0},
    "italic": {},
    "folder": {},
}


def config_from_dict(cls, d):
    """Rebuild a config stored in a checkpoint (lists back to tuples); unknown keys are an error."""
    names = {f.name for f in fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
