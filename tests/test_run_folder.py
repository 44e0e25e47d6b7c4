"""One run, one folder: a run folder's record (run.json) says which kind of run it holds and which
files are that run's; --overwrite and --resume act only on a run of the same kind, and remove only
what the record lists. A failed start leaves no empty folder behind."""
import json
import os
import shutil

import pytest
import torch
from conftest import TINY_FLAGS, one_line_error, run_cli
from test_hostile import digest

from harness.files import CheckpointError
from harness.run import RECORD, read_record

FT = ["--max-steps", "2", "--eval-n", "0", "--no-figures", "--batch-size", "16"]


@pytest.fixture
def training(tiny_ckpt, tmp_path):
    """A copy of the tiny training run's folder (its record says "training")."""
    folder = tmp_path / "train"
    shutil.copytree(os.path.dirname(tiny_ckpt), folder)
    return folder


def test_a_run_records_its_kind_and_files(training, tmp_path):
    record = read_record(str(training))
    assert record["kind"] == "training" and record["pattern"] == r"samples_\d{6,}\.png"
    assert set(record["files"]) == {"ckpt.pt", "loss.png", "samples.png", "eval_curve.csv", "eval_curve.png"}
    out = tmp_path / "lora"
    assert run_cli("lora_finetune.py", "--checkpoint", str(training / "ckpt.pt"), *FT, "--out", str(out),
                   "--export-peft").returncode == 0
    record = read_record(str(out))
    assert record["kind"] == "fine-tuning" and record["pattern"] is None
    assert {"finetune_ckpt.pt", "adapter.safetensors", "peft/adapter_model.safetensors",
            "peft/adapter_config.json"} <= set(record["files"])


@pytest.mark.parametrize("extra", [["--full"], []], ids=["full", "lora"])
def test_a_fine_tuning_run_never_replaces_a_training_runs_files(training, tmp_path, extra):
    """lora_finetune.py --overwrite --out <a training run's folder> (as an earlier refusal's hint
    said) once replaced its resumable ckpt.pt (--full) or deleted its loss.png (LoRA)."""
    base = tmp_path / "base.pt"
    shutil.copy(training / "ckpt.pt", base)
    (training / "finetune_ckpt.pt").write_bytes(b"")         # as an earlier refused attempt could leave it
    (training / "loss.png").write_bytes(b"the training run's curve")
    before = digest(str(training))
    for checkpoint in (base, training / "ckpt.pt"):
        for flags in (["--overwrite"], ["--resume"], []):
            r = run_cli("lora_finetune.py", "--checkpoint", str(checkpoint), *extra, *FT, *flags,
                        "--out", str(training))
            one_line_error(r, "holds a training run", "choose another --out")
    assert digest(str(training)) == before


def test_training_never_replaces_a_fine_tuning_runs_files(training, tmp_path):
    """train.py --overwrite --out <a --full fine-tune's folder> once replaced its weights."""
    out = tmp_path / "full"
    assert run_cli("lora_finetune.py", "--checkpoint", str(training / "ckpt.pt"), "--full", *FT,
                   "--out", str(out)).returncode == 0
    before = digest(str(out))
    for flags in (["--overwrite"], ["--resume"]):
        one_line_error(run_cli("train.py", *TINY_FLAGS, "--max-steps", "2", *flags, "--out", str(out)),
                       "holds a fine-tuning run")
    assert digest(str(out)) == before


def test_overwrite_removes_only_what_the_record_lists(training):
    (training / "samples.png").unlink(missing_ok=True)      # not there: nothing to remove
    (training / "mine.png").write_text("a user's file")
    record = read_record(str(training))
    record["files"].remove("loss.png")                      # as if the run never wrote it
    (training / RECORD).write_text(json.dumps(record))
    (training / "loss.png").write_bytes(b"not the run's: the record does not list it")
    loss = (training / "loss.png").read_bytes()
    assert run_cli("train.py", *TINY_FLAGS, "--max-steps", "1", "--no-figures", "--overwrite",
                   "--out", str(training)).returncode == 0
    assert (training / "loss.png").read_bytes() == loss and (training / "mine.png").read_text() == "a user's file"


def test_a_folder_without_a_record_is_resumed_but_never_overwritten(training):
    """A run from before records existed: --resume continues it (and records it); --overwrite
    would have to guess which files are the run's, so it is refused."""
    (training / RECORD).unlink()
    before = digest(str(training))
    one_line_error(run_cli("train.py", *TINY_FLAGS, "--max-steps", "2", "--overwrite", "--out", str(training)),
                   "no run.json", "move them away")
    assert digest(str(training)) == before
    assert run_cli("train.py", "--resume", "--max-steps", "6", "--no-figures", "--out", str(training)).returncode == 0
    assert read_record(str(training))["kind"] == "training"


@pytest.mark.parametrize("content", ["{not json", '{"kind": 5, "files": []}', '{"kind": "training", "files": ["../x"], '
                                     '"pattern": null}', '[]'])
def test_a_broken_record_is_one_line(training, content):
    (training / RECORD).write_text(content)
    before = digest(str(training))
    one_line_error(run_cli("train.py", *TINY_FLAGS, "--max-steps", "2", "--overwrite", "--out", str(training)),
                   RECORD)
    assert digest(str(training)) == before
    with pytest.raises(CheckpointError):
        read_record(str(training))


def test_a_failed_start_leaves_no_empty_folder(tmp_path):
    for script, flags in (("train.py", [*TINY_FLAGS, "--dataset", "folder", "--data-dir", str(tmp_path / "typo")]),
                          ("lora_finetune.py", ["--checkpoint", str(tmp_path / "typo.pt"), *FT])):
        out = tmp_path / f"new-{script}"
        one_line_error(run_cli(script, *flags, "--out", str(out)), "typo")
        assert not out.exists(), script
    (tmp_path / "kept").mkdir()                               # a folder the user made stays, even empty
    one_line_error(run_cli("train.py", *TINY_FLAGS, "--dataset", "folder", "--data-dir", str(tmp_path / "typo"),
                           "--out", str(tmp_path / "kept")), "typo")
    assert (tmp_path / "kept").is_dir()


def test_a_dash_folder_gets_a_resume_hint_that_works(tmp_path, monkeypatch):
    """`--out=-dash`: the printed hint says `--out=-dash` (`--out -dash` reads as two flags)."""
    import shlex

    import train
    from config import TrainConfig
    from harness.cli import run_cli as script_cli
    from harness.run import resume_command
    monkeypatch.chdir(tmp_path)
    assert script_cli(train.main, [*TINY_FLAGS, "--max-steps", "2", "--no-figures", "--out=-dash"]) == 0
    hint = resume_command("train.py", TrainConfig(out="-dash", max_steps=3))
    assert hint == "python train.py --out=-dash --resume --max-steps 3"
    assert script_cli(train.main, [*shlex.split(hint)[2:], "--no-figures"]) == 0, "the hint (figures aside)"
    assert read_record(str(tmp_path / "-dash"))["kind"] == "training"


def test_a_resumed_run_reports_its_own_steps(training, capsys):
    import train
    from harness.cli import run_cli as script_cli
    assert script_cli(train.main, ["--resume", "--max-steps", "7", "--no-figures", "--out", str(training)]) == 0
    out = capsys.readouterr().out
    assert "trained 4 steps in" in out and "(step 7)" in out, out       # the tiny run stopped at step 3


def test_flags_are_never_abbreviated_and_a_dash_value_is_explained():
    from harness.scripts import sample_args
    with pytest.raises(SystemExit):
        sample_args(["--lab", "7"])                                   # no longer --label
    import evaluate
    assert evaluate.parse_args(["--sweep-guidance=-1,2"]).sweep_guidance == "-1,2"


def test_a_run_on_a_moved_data_folder_resumes_from_its_new_place(tmp_path):
    """The run's folder dataset moved: --resume says to pass --data-dir; the new place is taken when
    it holds the same digits, refused when it holds others."""
    from test_dataset import digit_folder
    data, out = digit_folder(str(tmp_path / "digits"), per_digit=2), str(tmp_path / "run")
    flags = [*TINY_FLAGS, "--dataset", "folder", "--data-dir", data, "--batch-size", "4", "--no-figures"]
    assert run_cli("train.py", *flags, "--max-steps", "2", "--out", out).returncode == 0
    moved = str(tmp_path / "moved")
    os.rename(data, moved)
    one_line_error(run_cli("train.py", "--resume", "--max-steps", "3", "--no-figures", "--out", out),
                   "is not there any more", "--data-dir")
    other = digit_folder(str(tmp_path / "other"), per_digit=3)
    one_line_error(run_cli("train.py", "--resume", "--max-steps", "3", "--no-figures", "--data-dir", other,
                           "--out", out), "not the digits this run trained on")
    r = run_cli("train.py", "--resume", "--max-steps", "3", "--no-figures", "--data-dir", moved, "--out", out)
    assert r.returncode == 0 and "(step 3)" in r.stdout, r.stderr


def test_each_refusal_suggests_only_what_works(training):
    """Followed verbatim, every suggestion of the no-clobber refusals works; none is printed that cannot."""
    resume = ["--max-steps", "4", "--no-figures", "--out", str(training)]
    r = run_cli("train.py", *TINY_FLAGS, *resume)
    one_line_error(r, "pass --resume to continue it or --overwrite to start again")
    assert run_cli("train.py", "--resume", *resume).returncode == 0
    assert run_cli("train.py", *TINY_FLAGS, "--overwrite", *resume).returncode == 0
    (training / RECORD).unlink()                                # a run from before records
    r = run_cli("train.py", *TINY_FLAGS, *resume)
    one_line_error(r, "pass --resume to continue it (or choose another --out)")
    assert "--overwrite" not in r.stderr, "it would be refused without a record"
    assert run_cli("train.py", "--resume", "--max-steps", "5", "--no-figures", "--out", str(training)).returncode == 0
    (training / RECORD).unlink()
    (training / "ckpt.pt").unlink()
    (training / "loss.png").write_bytes(b"whose?")
    one_line_error(run_cli("train.py", *TINY_FLAGS, *resume), "already holds loss.png", "move them away")


@pytest.mark.parametrize("edit", [{"pattern": ".*"}, {"pattern": "("}, {"files": ["ckpt.pt", "notes.txt", "a/b/x",
                                                                                  "../outside.txt"]}])
def test_an_edited_record_never_widens_what_overwrite_removes(training, tmp_path, edit):
    """A record edited to list a user's file, a path through a link or outside the folder, or a
    pattern of its own, removes nothing more than this script's own files (and is no traceback)."""
    (training / "notes.txt").write_text("mine")
    victim = tmp_path / "victim" / "b"
    victim.mkdir(parents=True)
    (victim / "x").write_text("precious")
    (tmp_path / "outside.txt").write_text("precious too")
    os.symlink(tmp_path / "victim", training / "a")
    record = {**read_record(str(training)), **edit}
    (training / RECORD).write_text(json.dumps(record))
    r = run_cli("train.py", *TINY_FLAGS, "--max-steps", "1", "--no-figures", "--overwrite", "--out", str(training))
    if "../outside.txt" in record["files"]:
        one_line_error(r, RECORD)                               # not a record of this project
    else:
        assert r.returncode == 0, r.stderr
    assert (training / "notes.txt").read_text() == "mine" and (victim / "x").read_text() == "precious"
    assert (tmp_path / "outside.txt").read_text() == "precious too"


def test_nothing_is_removed_through_a_linked_folder_at_any_depth(tmp_path):
    from harness.files import remove_run_files
    (tmp_path / "victim" / "b").mkdir(parents=True)
    (tmp_path / "victim" / "b" / "x").write_text("precious")
    (tmp_path / "run").mkdir()
    os.symlink(tmp_path / "victim", tmp_path / "run" / "a")
    remove_run_files(str(tmp_path / "run"), ["a/b/x", "a/b/../b/x"])
    assert (tmp_path / "victim" / "b" / "x").read_text() == "precious"


def test_a_full_fine_tune_resumed_without_full_keeps_its_record(training, tmp_path):
    """The resume hint of a --full run has no --full (the stored run decides): the record must still
    list ckpt.pt, so that a later --overwrite removes it with the rest of the run."""
    out = tmp_path / "full"
    base = ["--checkpoint", str(training / "ckpt.pt"), "--eval-n", "0", "--no-figures", "--batch-size", "16"]
    assert run_cli("lora_finetune.py", *base, "--full", "--max-steps", "1", "--out", str(out)).returncode == 0
    assert run_cli("lora_finetune.py", *base, "--resume", "--max-steps", "2", "--out", str(out)).returncode == 0
    assert "ckpt.pt" in read_record(str(out))["files"]
    assert run_cli("lora_finetune.py", *base, "--overwrite", "--max-steps", "1", "--out", str(out)).returncode == 0
    assert not (out / "ckpt.pt").exists() and (out / "adapter.safetensors").exists()


def test_the_resume_hint_names_the_script_as_it_was_run(monkeypatch):
    from config import TrainConfig
    from harness.run import resume_command
    monkeypatch.setattr("sys.argv", ["/elsewhere/train.py", "--out", "r"])
    assert resume_command("train.py", TrainConfig(out="r")) == "python /elsewhere/train.py --out r --resume"
    monkeypatch.setattr("sys.argv", ["pytest"])
    assert resume_command("train.py", TrainConfig(out="r")) == "python train.py --out r --resume"


def test_an_output_never_replaces_a_run_record(training, tmp_path):
    r = run_cli("sample.py", "--checkpoint", str(training / "ckpt.pt"), "--steps", "2", "--n", "1",
                "--out", str(training / RECORD))
    one_line_error(r, "run folder's record")
    assert read_record(str(training))["kind"] == "training"


def test_a_fine_tune_on_a_moved_style_folder_resumes_from_its_new_place(tiny_ckpt, tmp_path):
    """As for a training run's data folder: the moved --style-dir is named, another folder's digits
    are refused, the same digits in the new place resume the run."""
    from test_dataset import digit_folder
    style, out = digit_folder(str(tmp_path / "mine"), per_digit=2), str(tmp_path / "ft")
    base = ["--checkpoint", tiny_ckpt, "--eval-n", "0", "--no-figures", "--batch-size", "4"]
    assert run_cli("lora_finetune.py", *base, "--style-dir", style, "--max-steps", "2", "--out", out).returncode == 0
    moved = str(tmp_path / "moved")
    os.rename(style, moved)
    resume = ["--resume", "--max-steps", "3", "--no-figures", "--out", out]
    one_line_error(run_cli("lora_finetune.py", *resume), "is not there any more", "--style-dir")
    other = digit_folder(str(tmp_path / "other"), per_digit=3)
    one_line_error(run_cli("lora_finetune.py", *resume, "--style-dir", other), "not the digits this run was tuned on")
    r = run_cli("lora_finetune.py", *resume, "--style-dir", moved)
    assert r.returncode == 0 and "trained 1 steps" in r.stdout and "step 3)" in r.stdout, r.stdout
    assert read_record(out)["kind"] == "fine-tuning"


@pytest.mark.parametrize("where", ["harness.run.torch.manual_seed", "harness.scripts.resume_command"])
def test_ctrl_c_between_the_lock_and_the_runs_with_leaves_no_folder(tmp_path, monkeypatch, where):
    """Ctrl-C just after the folder is made and locked (inside open_run, or after it returned but
    before the script's `with`): exit 130, one line, and neither the folder nor its .lock stays."""
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(where, interrupt)
    out = tmp_path / "run"
    r = run_cli("train.py", *TINY_FLAGS, "--max-steps", "2", "--no-figures", "--out", str(out))
    assert (r.returncode, r.stderr.strip()) == (130, "train.py: interrupted")
    assert not out.exists()


def test_a_run_never_starts_where_its_own_base_would_be_removed(tiny_ckpt, tmp_path):
    """A LoRA run whose --checkpoint is the --full model of its --out folder: refused with and
    without --overwrite (which would remove the base it reads), the model untouched."""
    full = str(tmp_path / "full")
    assert run_cli("lora_finetune.py", "--checkpoint", tiny_ckpt, "--full", *FT, "--out", full).returncode == 0
    model = os.path.join(full, "ckpt.pt")
    before = digest(model)
    for flags in ([], ["--overwrite"]):
        one_line_error(run_cli("lora_finetune.py", "--checkpoint", model, *FT, "--out", full, *flags),
                       f"--checkpoint {model} is the ckpt.pt of the run in {full}", "choose another --out")
    assert digest(model) == before
    other = str(tmp_path / "lora")                 # the hint, followed
    assert run_cli("lora_finetune.py", "--checkpoint", model, *FT, "--out", other).returncode == 0


def test_a_record_nested_too_deep_is_one_line(training):
    (training / RECORD).write_text("[" * 200_000)
    one_line_error(run_cli("train.py", "--resume", "--out", str(training), "--max-steps", "4", "--no-figures"),
                   "not a readable run record")


def test_resume_and_overwrite_together_are_refused(training):
    for script in ("train.py", "lora_finetune.py"):
        one_line_error(run_cli(script, "--resume", "--overwrite", "--out", str(training)),
                       "--resume continues the run in --out and --overwrite starts it again: give one of them")


def test_resuming_a_fine_tune_names_the_flag_that_contradicts_it(tiny_ckpt, tmp_path):
    """--dataset styled fits an italic run (it is resumed); --dataset folder does not, and the
    refusal names --dataset folder, not a --style the user never gave."""
    out = str(tmp_path / "italic")
    assert run_cli("lora_finetune.py", "--checkpoint", tiny_ckpt, "--style", "italic", *FT, "--out", out).returncode == 0
    one_line_error(run_cli("lora_finetune.py", "--resume", "--dataset", "folder", "--out", out, "--max-steps", "3"),
                   "--dataset folder: this run was tuned on italic digits; drop --dataset folder")
    r = run_cli("lora_finetune.py", "--resume", "--dataset", "styled", "--out", out, "--max-steps", "3",
                "--no-figures")
    assert r.returncode == 0, r.stderr
    assert torch.load(os.path.join(out, "finetune_ckpt.pt"), weights_only=True)["step"] == 3


def test_evaluate_refuses_flags_that_cannot_change_an_npz_score(tmp_path):
    import numpy as np
    npz = str(tmp_path / "x.npz")
    np.savez(npz, images=np.zeros((10, 28, 28), dtype=np.uint8), labels=np.arange(10))
    for flags, named in ((["--sweep-guidance", "1,2"], "--sweep-guidance"), (["--lora", "a.safetensors"], "--lora"),
                         (["--steps", "10", "--guidance", "3"], "--steps, --guidance"), (["--n", "5"], "--n")):
        one_line_error(run_cli("evaluate.py", "--npz", npz, *flags), f"--npz scores images already drawn: {named} ")
    assert not os.path.exists(str(tmp_path / "x_eval.json"))


def test_interrupts_held_raises_once_the_block_is_over():
    """What open_run sets up under interrupts_held (folder, lock, write test) is whole when a Ctrl-C
    or SIGTERM that came meanwhile is raised: after the block, as a KeyboardInterrupt."""
    import signal

    from harness.run import interrupts_held
    previous = {s: signal.signal(s, signal.default_int_handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:                                  # (as in a script; a shell's background job starts with SIGINT ignored)
        for sig in (signal.SIGINT, signal.SIGTERM):
            done = []
            with pytest.raises(KeyboardInterrupt):
                with interrupts_held():
                    os.kill(os.getpid(), sig)
                    done.append("the rest of the block")
            assert done == ["the rest of the block"]
        assert signal.getsignal(signal.SIGTERM) is signal.default_int_handler
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def test_kill_right_after_the_folder_appears_is_one_line_and_leaves_nothing(tmp_path):
    """SIGTERM (`kill PID`) at the moment the run folder appears: one line, and no folder, no .lock
    and no temp file stay behind (the probe found a .lock)."""
    import signal
    import subprocess
    import sys
    import time
    from conftest import ROOT
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *TINY_FLAGS, "--max-steps", "50",
                          "--no-figures", "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not out.exists() and p.poll() is None:
        time.sleep(0.001)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate()
    assert err.strip().splitlines()[-1] == "train.py: interrupted" and "Traceback" not in err
    assert p.returncode in (130, 143) and (not out.exists() or sorted(os.listdir(out)) in ([], ["ckpt.pt", "run.json"]))


def test_out_paths_that_name_no_folder_are_one_line(training, tmp_path, tiny_ckpt):
    one_line_error(run_cli("train.py", "--out", ""), "--out is empty: name a run folder")
    model = str(training / "ckpt.pt")
    one_line_error(run_cli("train.py", "--out", model), f"--out {model}: is a file, not a run folder")
    r = run_cli("sample.py", "--checkpoint", tiny_ckpt, "--steps", "2", "--out", str(tmp_path / "pngs") + "/")
    one_line_error(r, "is a folder; give a file name")  # not yet made: a name ending in /
    one_line_error(run_cli("sample.py", "--checkpoint", tiny_ckpt, "--out="), "--out is empty")
    assert not (tmp_path / "pngs").exists()


def test_the_resume_hint_keeps_no_figures(monkeypatch):
    from config import TrainConfig
    from harness.run import resume_command
    monkeypatch.setattr("sys.argv", ["train.py"])
    assert resume_command("train.py", TrainConfig(out="o"), figures=False) == "python train.py --out o --resume --no-figures"
    assert resume_command("train.py", TrainConfig(out="o")) == "python train.py --out o --resume"


def test_the_italic_hint_names_a_folder_that_is_free_and_a_dash_path_that_parses(tmp_path):
    import shlex

    import lora_finetune
    from harness.scripts import finetune_args
    taken = tmp_path / "it-all-r8"
    taken.mkdir()
    words = shlex.split(lora_finetune.best_italic_command(str(tmp_path / "b.pt"), str(tmp_path / "it")))
    args = finetune_args(words[2:])
    assert (args.out, args.checkpoint, args.steps) == (str(tmp_path / "it-all-r8-1"), str(tmp_path / "b.pt"), 1680)
    assert finetune_args(shlex.split(lora_finetune.best_italic_command("b.pt", "-dash"))[2:]).out == "-dash-all-r8"


def test_fourth_probe_each_is_one_line_or_lands_apart(tiny_ckpt, tmp_path):
    """A fine-tuning state passed as a model, visualize.py --threads out of range and --full with
    LoRA-only flags are one line; a LoRA grid lands beside its adapter, not over the base's grid;
    evaluate.py names a second adapter by its folder too."""
    import evaluate
    lora = str(tmp_path / "lora")
    assert run_cli("lora_finetune.py", "--checkpoint", tiny_ckpt, *FT, "--out", lora).returncode == 0
    state = os.path.join(lora, "finetune_ckpt.pt")
    one_line_error(run_cli("sample.py", "--checkpoint", state, "--steps", "2"), "is a fine-tuning run's state, not a model")
    one_line_error(run_cli("visualize.py", "--checkpoint", tiny_ckpt, "--check", "--threads", "100000"),
                   "--threads 100000: must be between 0")
    one_line_error(run_cli("lora_finetune.py", "--checkpoint", tiny_ckpt, "--full", "--export-peft", "--r", "8",
                           "--out", str(tmp_path / "f")), "--full trains every weight", "--export-peft, --r")
    r = run_cli("sample.py", "--checkpoint", tiny_ckpt, "--steps", "2", "--lora", os.path.join(lora, "adapter.safetensors"))
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == os.path.join(lora, "sample_7.png"), r.stdout
    assert evaluate.adapter_name("runs/lora-italic/adapter.safetensors") == "lora-italic-adapter"
