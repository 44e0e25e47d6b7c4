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
from harness.files import (DEFAULT_CHECKPOINT, MODEL_FORMAT, SHIPPED, check_outputs, dataset_of, file_digest,
                           load_model)
from lora import LoraError

ADAPTERS = "bold=runs/lora-bold/adapter.safetensors,italic=runs/lora-italic/adapter.safetensors"


def parse_adapters(text):
    """'bold=PATH,italic=PATH' -> {"bold": PATH, "italic": PATH}."""
    pairs = [item.partition("=") for item in text.split(",")] if text else []
    if any(not name.isidentifier() or not sep or not path for name, sep, path in pairs):
        raise UsageError(f"--adapters {text!r}: expected name=path pairs such as {ADAPTERS}")
    return {name: path for name, _, path in pairs}


def main(argv=None):
    p = Parser(prog="tools/ship_weights.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help=f"the base run (default: {DEFAULT_CHECKPOINT})")
    p.add_argument("--adapters", default=ADAPTERS, help=f"name=adapter pairs, '' for none (default: {ADAPTERS})")
    p.add_argument("--out", default=SHIPPED, help=f"folder (default: {SHIPPED})")
    args = p.parse_args(argv)
    adapters = parse_adapters(args.adapters)
    files = {"model": os.path.join(args.out, "model.safetensors"),
             **{name: os.path.join(args.out, name + ".safetensors") for name in adapters}}
    check_outputs({f"--out {name}": path for name, path in files.items()},
                  {"--checkpoint": args.checkpoint, "--adapters": list(adapters.values())}, weights_ok=True)
    model, _, ckpt = load_model(args.checkpoint)
    fingerprint = base_fingerprint(model)
    config = json.loads(json.dumps(ckpt["config"]))                       # tuples -> lists, as stored
    half = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    adapted = []
    for name, path in adapters.items():                                   # every input checked before writing
        tensors, meta = read_adapter(path)
        if meta.get("base_fingerprint") != fingerprint:
            raise LoraError(f"{path}: adapter was trained on other base weights than {args.checkpoint}")
        adapted.append((name, tensors, meta))
    write_safetensors(files["model"], half, {"format": MODEL_FORMAT, "config": json.dumps(config),
                                             "data": dataset_of(ckpt), "source_sha256": file_digest(args.checkpoint)})
    shipped_model, _, _ = load_model(files["model"])
    for name, tensors, meta in adapted:
        write_safetensors(files[name], {k: v.half().contiguous() for k, v in tensors.items()},
                          {**meta, "base_fingerprint": base_fingerprint(shipped_model)})
    for name, path in files.items():
        if name != "model":                                               # each loads onto the shipped base
            load_adapter(load_model(files["model"])[0], path, config["model"])
        print(f"{path}  {os.path.getsize(path) / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
