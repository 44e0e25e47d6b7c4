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

    monkeypatch.setattr(lora_table.subprocess, "run", fake_run)
    args = argparse.Namespace(out=str(tmp_path), style="italic", eval_n=10, checkpoint="ckpt.pt")
    assert lora_table.run_row("attn", 4, args, []) == {"run": 1}
    assert lora_table.run_row("attn", 4, args, []) == {"run": 1} and len(runs) == 1   # read, not re-run
    assert lora_table.run_row("attn", 4, args, ["--epochs", "12"]) == {"run": 2}      # changed flags
    assert "--epochs" in runs[-1] and len(runs) == 2
    os.remove(os.path.join(tmp_path, "attn-r4", "row_flags.json"))                     # unknown origin
    assert lora_table.run_row("attn", 4, args, ["--epochs", "12"]) == {"run": 3}
