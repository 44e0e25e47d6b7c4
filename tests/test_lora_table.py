"""lora_table.py's bookkeeping: row parsing, folder names, and when a row is re-run."""
import argparse
import json
import os
import subprocess

import pytest

import lora_table


def test_parse_rows():
    assert lora_table.parse_rows("attn:4,attn+ff:16") == [("attn", 4), ("attn+ff", 16)]
    for bad in ("attn", "attn:0", ":4", "attn:x"):
        with pytest.raises(ValueError, match="TARGETS:RANK"):
            lora_table.parse_rows(bad)


def test_row_folder_is_one_safe_path_component():
    assert lora_table.row_folder("attn+conv", 2) == "attn+conv-r2"
    name = lora_table.row_folder(r"^mid\.\d/x\.conv(1|2)$", 3)
    assert os.sep not in name and name.endswith("-r3") and name[0].isalnum()


def test_a_row_is_reused_only_with_the_same_flags(tmp_path, monkeypatch):
    runs = []

    def fake_run(cmd):                          # stands in for lora_finetune.py: writes a summary
        runs.append(cmd)
        out = cmd[cmd.index("--out") + 1]
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump({"run": len(runs)}, f)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(lora_table, "run_child", lambda cmd: fake_run(cmd).returncode)
    args = argparse.Namespace(out=str(tmp_path), style="italic", eval_n=10, checkpoint="ckpt.pt")
    assert lora_table.run_row("attn", 4, args, []) == {"run": 1}
    assert lora_table.run_row("attn", 4, args, []) == {"run": 1} and len(runs) == 1   # read, not re-run
    assert lora_table.run_row("attn", 4, args, ["--epochs", "12"]) == {"run": 2}      # changed flags
    assert "--epochs" in runs[-1] and len(runs) == 2
    os.remove(os.path.join(tmp_path, "attn-r4", "row_flags.json"))                     # unknown origin
    assert lora_table.run_row("attn", 4, args, ["--epochs", "12"]) == {"run": 3}


def test_an_interrupted_row_is_resumed_not_started_again(tmp_path, monkeypatch):
    """A row stopped by Ctrl-C (lora_finetune saved its checkpoint, exit 130) is continued with
    --resume by the next lora_table.py run, not retrained from step 0; a failed row is one line."""
    runs, codes = [], [130, 0]

    def fake_run(cmd):
        runs.append(cmd)
        out = cmd[cmd.index("--out") + 1]
        open(os.path.join(out, "finetune_ckpt.pt"), "w").close()      # saved when interrupted
        if codes[len(runs) - 1] == 0:
            with open(os.path.join(out, "summary.json"), "w") as f:
                json.dump({"run": len(runs)}, f)
        return subprocess.CompletedProcess(cmd, codes[len(runs) - 1])

    monkeypatch.setattr(lora_table, "run_child", lambda cmd: fake_run(cmd).returncode)
    args = argparse.Namespace(out=str(tmp_path), style="italic", eval_n=10, checkpoint="ckpt.pt")
    with pytest.raises(lora_table.TableError, match="attn r=4 failed or was interrupted"):
        lora_table.run_row("attn", 4, args, [])
    assert "--overwrite" in runs[0]
    assert lora_table.run_row("attn", 4, args, []) == {"run": 2}
    assert "--resume" in runs[1] and "--overwrite" not in runs[1]


def test_ctrl_c_waits_for_the_row_to_save(monkeypatch):
    """Ctrl-C reaches lora_table.py and its lora_finetune.py child at once: the table waits for
    the child to finish saving (subprocess.run would kill it after 0.25 s), then stops."""
    import sys
    import time
    cmd = [sys.executable, "-c", "import signal, sys, time; signal.signal(signal.SIGINT, lambda *a: "
           "(time.sleep(1.0), sys.exit(130))); print('ready', flush=True); time.sleep(30)"]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    child.stdout.readline()

    class FakePopen:                                   # the same child, interrupted as a terminal would
        def __init__(self, _):
            self.calls = 0

        def wait(self):
            self.calls += 1
            if self.calls == 1:
                child.send_signal(subprocess.signal.SIGINT)
                raise KeyboardInterrupt
            return child.wait()

    monkeypatch.setattr(lora_table.subprocess, "Popen", FakePopen)
    t0 = time.time()
    with pytest.raises(KeyboardInterrupt):
        lora_table.run_child(cmd)
    assert child.returncode == 130 and time.time() - t0 >= 1.0     # it finished its 1 s of saving
