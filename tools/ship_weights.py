"""Make weights/ from your runs: `python tools/ship_weights.py` writes the default run's EMA weights
and its bold and italic LoRA adapters as fp16 safetensors (about 2 MB together), which
`python sample.py` and `python demo.py` use when no run of yours exists.

Half precision halves the files and changes no digit (tests/test_weights.py judges them). The
adapters are stamped for the fp16 base they will be applied to, after checking that they were
trained on the checkpoint given.
"""
import os  # isort:skip
import sys  # isort:skip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the project's modules
sys.path.insert(0, ROOT)
import harness  # noqa: F401  isort:skip -- first: Ctrl-C while the rest imports is one line

import json

from harness.adapters import base_fingerprint, load_adapter, read_adapter, write_safetensors
from harness.cli import Parser, UsageError, run_cli
from harness.files import (DEFAULT_CHECKPOINT, MODEL_FORMAT, SHIPPED, CheckpointError, check_outputs, dataset_of,
                           file_digest, load_model, read_model_file)
from harness.run import interrupts_held
from lora import LoraError

ADAPTERS = "bold=runs/lora-bold/adapter.safetensors,italic=runs/lora-italic/adapter.safetensors"


def parse_adapters(text):
    """'bold=PATH,italic=PATH' -> {"bold": PATH, "italic": PATH}; names are file names: not "model", once each."""
    pairs = [item.partition("=") for item in text.split(",")] if text else []
    if any(not name.isidentifier() or not sep or not path for name, sep, path in pairs):
        raise UsageError(f"--adapters {text!r}: expected name=path pairs such as {ADAPTERS}")
    names = [name for name, _, _ in pairs]
    folded = [n.lower() for n in names]                 # Model.safetensors is model.safetensors on macOS
    clash = sorted({n for n in names if folded.count(n.lower()) > 1 or n.lower() == "model"})
    if clash:
        raise UsageError(f"--adapters: {', '.join(clash)} named twice (model.safetensors is the model's file; "
                         "names differing only in case are one file on some systems)")
    return {name: path for name, _, path in pairs}


def check_out_folder(out, files):
    """--out holds shipped weights only: a new folder, or one this tool wrote (its model.safetensors
    is a shipped model), which then keeps no adapter of an older base. A run folder, or any other
    folder with weights in it, is refused: nothing of another run is ever replaced."""
    if any(os.path.lexists(os.path.join(parent, "run.json")) for parent in parents(out)):
        raise UsageError(f"--out {out}: is in a run folder; give a folder of its own (default: weights/)")
    if not os.path.isdir(out):
        return
    weights = sorted(f for f in os.listdir(out) if f.endswith((".safetensors", ".pt")))
    if not weights:
        return
    if read_model_file_or_none(files["model"]) is None:
        raise UsageError(f"--out {out}: holds weights ({', '.join(weights[:3])}) that this command did not write; "
                         "give another folder")
    stale = [f for f in weights if f not in {os.path.basename(p) for p in files.values()}]
    if stale:
        raise UsageError(f"--out {out}: would keep {', '.join(stale)}, made for the weights it replaces; list "
                         "them in --adapters, or give another folder")


def parents(path):
    """path and every folder above it."""
    path = os.path.realpath(path)
    while True:
        yield path
        if os.path.dirname(path) == path:
            return
        path = os.path.dirname(path)


def read_model_file_or_none(path):
    """The shipped model at path, or None when there is none or it is something else."""
    try:
        return read_model_file(path) if os.path.isfile(path) else None
    except CheckpointError:
        return None


def write_weights(out, files, model, ckpt, adapted):
    """The fp16 model and the adapters re-stamped for it, each loaded back to check it. A folder
    this makes is removed again if the first write fails."""
    config = json.loads(json.dumps(ckpt["config"]))                       # tuples -> lists, as stored
    half = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    created = not os.path.isdir(out)
    os.makedirs(out, exist_ok=True)
    try:
        finetuned = {"finetuned": json.dumps(ckpt["finetuned"])} if ckpt.get("finetuned") else {}   # a --full run's style
        write_safetensors(files["model"], half, {"format": MODEL_FORMAT, "config": json.dumps(config),
                                                 "data": dataset_of(ckpt), "source_sha256": ckpt["sha256"], **finetuned})
    except BaseException:
        if created and not os.listdir(out):
            os.rmdir(out)
        raise
    shipped_model, _, _ = load_model(files["model"])
    for name, tensors, meta in adapted:
        write_safetensors(files[name], {k: v.half().contiguous() for k, v in tensors.items()},
                          {**meta, "base_fingerprint": base_fingerprint(shipped_model)})
    for name, path in files.items():
        if name != "model":                                               # each loads onto the shipped base
            load_adapter(load_model(files["model"])[0], path, config["model"])
        print(f"{path}  {os.path.getsize(path) / 1e6:.2f} MB")


def main(argv=None):
    """Check every input and output, then write the fp16 model and the re-stamped adapters."""
    p = Parser(prog="tools/ship_weights.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help=f"the base run (default: {DEFAULT_CHECKPOINT})")
    p.add_argument("--adapters", default=ADAPTERS, help=f"name=adapter pairs, '' for none (default: {ADAPTERS})")
    p.add_argument("--out", default=SHIPPED, help="folder (default: this repo's weights/)")
    args = p.parse_args(argv)
    adapters = parse_adapters(args.adapters)
    files = {"model": os.path.join(args.out, "model.safetensors"),
             **{name: os.path.join(args.out, name + ".safetensors") for name in adapters}}
    check_out_folder(args.out, files)
    check_outputs({f"--out {name}": path for name, path in files.items()},
                  {"--checkpoint": args.checkpoint, "--adapters": list(adapters.values())}, weights_ok=True,
                  create=True)
    model, _, ckpt = load_model(args.checkpoint)
    ckpt = {**ckpt, "sha256": file_digest(args.checkpoint)}
    fingerprint = base_fingerprint(model)
    adapted = []
    for name, path in adapters.items():                                   # every input checked before writing
        tensors, meta = read_adapter(path)
        if meta.get("base_fingerprint") != fingerprint:
            raise LoraError(f"{path}: adapter was trained on other base weights than {args.checkpoint}")
        adapted.append((name, tensors, meta))
    try:
        with interrupts_held():          # Ctrl-C now is raised once every file is written and checked
            write_weights(args.out, files, model, ckpt, adapted)
    except KeyboardInterrupt:
        print(f"tools/ship_weights.py: interrupted after every file in {args.out} was written and checked",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
