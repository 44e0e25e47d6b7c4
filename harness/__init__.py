"""The safety harness: everything about running the article's code safely and conveniently,
kept out of the files that teach it. See harness/README.md for what it guarantees.

Importing it first thing in a script makes Ctrl-C during the seconds of start-up (torch and
friends importing) one line and exit 130, instead of a traceback; run_cli gives Ctrl-C back
its usual meaning once the script's main() starts."""
import os
import signal
import sys
import threading

SCRIPTS = {"train.py", "lora_finetune.py", "sample.py", "evaluate.py", "visualize.py", "bench.py", "lora_table.py"}


def _interrupted_while_starting(signum, frame):
    os.write(2, f"{os.path.basename(sys.argv[0])}: interrupted\n".encode())
    os._exit(130)                                   # nothing is written yet: nothing to save or to clean


if (os.path.basename(getattr(sys.modules.get("__main__"), "__file__", None) or "") in SCRIPTS
        and threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
    signal.signal(signal.SIGINT, _interrupted_while_starting)
