"""The safety harness: everything about running the article's code safely and conveniently,
kept out of the files that teach it. See harness/README.md for what it guarantees.

Importing it first thing in a script makes Ctrl-C during the seconds of start-up (torch and
friends importing) one line and exit 130, instead of a traceback; run_cli gives Ctrl-C back
its usual meaning once the script's main() starts. A package of requirements.txt missing at
one of a script's own imports is one line too (run_cli does the same for later imports)."""
import os
import signal
import sys
import threading

# This project's own modules: one of them missing is a bug (it keeps its traceback); any other
# module missing is a package of requirements.txt, or a package one of them needs.
PROJECT = {"config", "dataset", "conv_block", "cross_attn", "unet", "diffusion", "lora", "train", "lora_finetune",
           "sample", "evaluate", "visualize", "demo", "harness", "tools", "bench", "lora_table", "negative", "ship_weights",
           "conftest"}
SCRIPTS = {"train.py", "lora_finetune.py", "sample.py", "evaluate.py", "visualize.py", "demo.py", "bench.py",
           "lora_table.py", "negative.py", "ship_weights.py"}


def _interrupted_while_starting(signum, frame):
    os.write(2, f"{os.path.basename(sys.argv[0])}: interrupted\n".encode())
    os._exit(128 + signum)                          # nothing is written yet: nothing to save or to clean


AS_SCRIPT = os.path.basename(getattr(sys.modules.get("__main__"), "__file__", None) or "") in SCRIPTS
if AS_SCRIPT and threading.current_thread() is threading.main_thread():
    for _signal, _default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
        if signal.getsignal(_signal) is _default:       # Ctrl-C, and `kill PID`
            signal.signal(_signal, _interrupted_while_starting)


def missing_package(error):
    """The line for a ModuleNotFoundError that a package install fixes, or None (our own module:
    a bug, which keeps its traceback)."""
    name = (getattr(error, "name", None) or "").split(".")[0]
    if not isinstance(error, ModuleNotFoundError) or not name or name in PROJECT:
        return None
    return f"the package {name} is missing: pip install -r requirements.txt"


def _missing_package(kind, error, tb):
    line = missing_package(error)
    if line:
        sys.stderr.write(f"{os.path.basename(sys.argv[0])}: error: {line}\n")
    else:
        sys.__excepthook__(kind, error, tb)


if AS_SCRIPT:
    sys.excepthook = _missing_package              # exit status stays 1, as for any uncaught error
