"""lora_table.py's bookkeeping: row parsing, folder names, and when a row is re-run."""
import argparse
import json
import os
import subprocess

import lora_table
import pytest
from conftest import one_line_error, run_cli


def test_parse_rows():
    assert lora_table.parse_rows("attn:4,attn+ff:16") == [("attn", 4), ("attn+ff", 16)]
    for bad in ("attn", "attn:0", ":4", "attn:x"):
        with pytest.raises(ValueError, match="TARGETS:RANK"):
            lora_table.parse_rows(bad)
    with pytest.raises(ValueError, match="row attn:4 listed twice"):       # one row, run once
        lora_table.parse_rows("attn:4,qkv:4,attn:4")


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
            json.dump(done(len(runs)), f)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(lora_table, "run_child", lambda cmd: fake_run(cmd).returncode)
    args = argparse.Namespace(out=str(tmp_path / "table"), style="italic", eval_n=10, checkpoint=base(tmp_path))
    assert lora_table.run_row("attn", 4, args, []) == done(1)
    assert lora_table.run_row("attn", 4, args, []) == done(1) and len(runs) == 1   # read, not re-run
    assert lora_table.run_row("attn", 4, args, ["--steps", "12"]) == done(2)      # changed flags
    assert "--steps" in runs[-1] and len(runs) == 2
    assert lora_table.run_row("attn", 4, args, ["--steps=12"]) == done(2) and len(runs) == 2   # one flag, spelt
    os.remove(os.path.join(args.out, "attn-r4", "row_flags.json"))                 # unknown origin
    assert lora_table.run_row("attn", 4, args, ["--steps", "12"]) == done(3)
    base(tmp_path, b"retrained")                          # the base retrained at the same path: a new row
    assert lora_table.run_row("attn", 4, args, ["--steps", "12"]) == done(4) and "--overwrite" in runs[-1]
    with open(os.path.join(args.out, "attn-r4", "summary.json"), "w") as f:
        f.write("{")                                      # a broken summary: the row runs again
    assert lora_table.run_row("attn", 4, args, ["--steps", "12"]) == done(5)
    monkeypatch.setattr(lora_table, "run_child", lambda cmd: 0)     # a row that wrote no summary: one line
    with open(os.path.join(args.out, "attn-r4", "summary.json"), "w") as f:
        json.dump({}, f)
    with pytest.raises(lora_table.TableError, match="summary.json is not a fine-tuning summary"):
        lora_table.run_row("attn", 4, args, ["--steps", "12"])


def base(folder, content=b"weights"):
    """A stand-in base checkpoint (the table only hashes it) -> its path."""
    path = os.path.join(folder, "ckpt.pt")
    with open(path, "wb") as f:
        f.write(content)
    return path


def done(n):
    """A complete summary of row attn:4 italic, told apart by its trainable count."""
    return summary(n, 0.5, 0.5, 0.9)


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
                json.dump(done(len(runs)), f)
        return subprocess.CompletedProcess(cmd, codes[len(runs) - 1])

    monkeypatch.setattr(lora_table, "run_child", lambda cmd: fake_run(cmd).returncode)
    args = argparse.Namespace(out=str(tmp_path / "table"), style="italic", eval_n=10, checkpoint=base(tmp_path))
    with pytest.raises(lora_table.TableError, match="attn r=4 was interrupted; run the same command again"):
        lora_table.run_row("attn", 4, args, [])
    assert "--overwrite" in runs[0]
    assert lora_table.run_row("attn", 4, args, []) == done(2)
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


def summary(trainable, ink, slant, acc, targets="attn", r=4, style="italic"):
    """A summary.json as lora_finetune.py writes it (the parts the table reads)."""
    return {"trainable": trainable, "total_params": 100_000, "file_bytes": 4 * 1024 * trainable // 1000,
            "ms_per_step": 12.5, "evaluation": {"shift": {"ink": ink, "slant": slant},
                                                "rows": {"fine-tuned model": {"accuracy": acc}}},
            "config": {"lora": {"targets": targets, "r": r, "style": style}}}


def test_the_table_from_its_rows_flags_to_markdown(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """Each row runs lora_finetune.py with its targets, r, alpha = r, the style, --eval-n, the base
    and the passed-through flags; the table holds each summary's numbers as it says."""
    cmds = []
    numbers = {"attn-r4": summary(2000, 0.1, 0.42, 0.97, "attn", 4), "conv-r2": summary(6000, 0.05, 0.85, 0.955, "conv", 2)}

    def fake_child(cmd):
        cmds.append(cmd)
        out = cmd[cmd.index("--out") + 1]
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(numbers[os.path.basename(out)], f)
        return 0
    monkeypatch.setattr(lora_table, "run_child", fake_child)
    out = str(tmp_path / "table")
    assert lora_table.main(["--rows", "attn:4,conv:2", "--style", "italic", "--eval-n", "7", "--checkpoint",
                            tiny_ckpt, "--out", out, "--epochs", "3"]) is None
    for cmd, (targets, r) in zip(cmds, [("attn", "4"), ("conv", "2")]):
        flags = cmd[2:]
        assert cmd[1].endswith("lora_finetune.py")
        assert flags[:14] == ["--style", "italic", "--targets", targets, "--r", r, "--alpha", r, "--eval-n", "7",
                              "--checkpoint", os.path.abspath(tiny_ckpt), "--epochs", "3"]
        assert flags[14:] == ["--out", os.path.join(out, f"{targets}-r{r}"), "--overwrite", "--no-figures"]
    rows = json.load(open(os.path.join(out, "table.json")))
    assert rows == [
        {"targets": "attn", "r": 4, "trainable": 2000, "fraction": 0.02, "adapter_kib": 8.0,
         "ink_shift": 0.1, "slant_shift": 0.42, "accuracy": 0.97, "ms_per_step": 12.5},
        {"targets": "conv", "r": 2, "trainable": 6000, "fraction": 0.06, "adapter_kib": 24.0,
         "ink_shift": 0.05, "slant_shift": 0.85, "accuracy": 0.955, "ms_per_step": 12.5}]
    text = capsys.readouterr().out
    assert "| targets | rank | trainable params | % of model | adapter | slant shift | accuracy |" in text
    assert "| attn | 4 | 2,000 | 2.0% | 8 KiB | 42% | 97.0% |" in text
    assert "| conv | 2 | 6,000 | 6.0% | 24 KiB | 85% | 95.5% |" in text
    assert os.path.getsize(os.path.join(out, "table.png")) > 1000
    assert lora_table.measure_of("bold") == "ink" and lora_table.measure_of("italic") == "slant"


@pytest.mark.parametrize("flags, needle", [(["--rows", "attn"], "TARGETS:RANK"), (["--eval-n", "0"], "--eval-n"),
                                           (["--eval-n", "10001"], "--eval-n")])
def test_bad_table_flags_are_a_usage_error(flags, needle, capsys):
    with pytest.raises(SystemExit) as e:
        lora_table.main(flags)
    assert e.value.code == 2 and needle in capsys.readouterr().err


def test_a_failed_row_does_not_suggest_running_it_again(tmp_path, monkeypatch):
    monkeypatch.setattr(lora_table, "run_child", lambda cmd: 1)
    args = argparse.Namespace(out=str(tmp_path / "table"), style="italic", eval_n=10, checkpoint=base(tmp_path))
    with pytest.raises(lora_table.TableError) as e:
        lora_table.run_row("attn", 4, args, [])
    assert "attn r=4 failed" in str(e.value) and "run the same command again" not in str(e.value)


@pytest.mark.parametrize("flags", [["--targets", "conv"], ["--r", "8"], ["--alpha=2"], ["--overwrite"], ["--full"]])
def test_a_passed_through_flag_may_not_override_a_rows_own(flags, tiny_ckpt, tmp_path):
    """`--rows attn:1 --targets conv` once ran conv adapters labelled "attn"; `--r 8` was read as --rows."""
    r = run_cli("tools/lora_table.py", "--checkpoint", tiny_ckpt, "--rows", "attn:1", "--out", str(tmp_path / "t"),
                *flags)
    one_line_error(r, "set by each row")
    assert not (tmp_path / "t").exists()


def test_terminating_the_table_stops_its_row_and_says_how_to_continue(tmp_path, monkeypatch):
    """kill <lora_table's PID> once left its lora_finetune child training on, unseen: the SIGTERM now
    goes on to the row (which saves and exits 130), and the table says to run it again."""
    import signal
    import sys
    import threading
    import time
    child = [sys.executable, "-c", "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(130));"
             " open(sys.argv[1], 'w').close(); time.sleep(60)", str(tmp_path / "started")]

    def kill_me_once_started():
        while not (tmp_path / "started").exists():
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=kill_me_once_started, daemon=True).start()
    t0 = time.time()
    assert lora_table.run_child(child) == 130 and time.time() - t0 < 30
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "the handler is given back"
    monkeypatch.setattr(lora_table, "run_child", lambda cmd: 130)
    args = argparse.Namespace(out=str(tmp_path / "table"), style="italic", eval_n=10, checkpoint=base(tmp_path))
    with pytest.raises(lora_table.TableError, match="interrupted; run the same command again"):
        lora_table.run_row("attn", 4, args, [])


def test_a_run_the_table_did_not_start_is_never_replaced(tmp_path, monkeypatch):
    """A LoRA run of the user's at <out>/<row> (no row_started.json: not the table's), or a run of
    other settings put into a row's folder, is refused in one line and left as it is."""
    monkeypatch.setattr(lora_table, "run_child", lambda cmd: pytest.fail("a row was run"))
    args = argparse.Namespace(out=str(tmp_path / "table"), style="italic", eval_n=10, checkpoint=base(tmp_path))
    folder = os.path.join(args.out, "attn-r4")
    os.makedirs(folder)
    for name, content in (("run.json", {"kind": "fine-tuning", "files": [], "pattern": None}),
                          ("summary.json", summary(7, 0.1, 0.1, 0.9, "qkv", 4, "bold"))):
        with open(os.path.join(folder, name), "w") as f:
            json.dump(content, f)
    with pytest.raises(lora_table.TableError, match="other settings than row attn r=4, italic \\(qkv r=4, bold\\); move it away"):
        lora_table.run_row("attn", 4, args, [])
    os.remove(os.path.join(folder, "summary.json"))
    with pytest.raises(lora_table.TableError, match="holds a fine-tuning run this table did not start"):
        lora_table.run_row("attn", 4, args, [])
    assert sorted(os.listdir(folder)) == ["run.json"]


def test_a_row_stopped_before_it_replaced_a_finished_run_starts_again(tmp_path, monkeypatch):
    """A changed row stopped before its --overwrite removed the earlier, finished run: the next table
    run starts it again with --overwrite, never --resume of the earlier run's checkpoint; a SIGTERM
    (exit 143) is an interruption, not a failure to fix."""
    runs = []

    def finish(cmd):
        runs.append(cmd)
        out = cmd[cmd.index("--out") + 1]
        os.makedirs(out, exist_ok=True)
        open(os.path.join(out, "finetune_ckpt.pt"), "wb").close()
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(done(len(runs)), f)
        return 0

    args = argparse.Namespace(out=str(tmp_path / "table"), style="italic", eval_n=10, checkpoint=base(tmp_path))
    monkeypatch.setattr(lora_table, "run_child", finish)
    assert lora_table.run_row("attn", 4, args, ["--steps", "2"]) == done(1)
    monkeypatch.setattr(lora_table, "run_child", lambda cmd: runs.append(cmd) or 143)   # stopped at once
    with pytest.raises(lora_table.TableError, match="was interrupted; run the same command again"):
        lora_table.run_row("attn", 4, args, ["--steps", "3"])
    monkeypatch.setattr(lora_table, "run_child", finish)
    assert lora_table.run_row("attn", 4, args, ["--steps", "3"]) == done(3)
    assert "--overwrite" in runs[-1] and "--resume" not in runs[-1]
