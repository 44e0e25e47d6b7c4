"""Checkpoints: round trip, atomic writes, and every bad file refused in one line."""
import os
from dataclasses import asdict

import pytest
import torch
from conftest import TINY, TINY_T, one_line_error, run_cli

from config import DiffusionConfig
from harness.files import CheckpointError, load_checkpoint, load_model, prepare_run_folder, save_checkpoint
from unet import UNet


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    model = UNet(TINY).eval()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(str(path), {"model": model.state_dict(), "config": {
        "model": asdict(TINY), "diffusion": asdict(DiffusionConfig(timesteps=TINY_T))}})
    loaded, diff_cfg, _ = load_model(str(path), ema=False)
    args = torch.randn(3, 1, 28, 28), torch.tensor([1, 2, 3]), torch.tensor([0, 4, 10])
    assert torch.equal(model(*args), loaded(*args)) and diff_cfg.timesteps == TINY_T
    assert os.listdir(tmp_path) == ["ckpt.pt"], "temp file left behind"


def test_sample_refuses_bad_checkpoints(tiny_ckpt, tmp_path):
    ckpt = load_checkpoint(tiny_ckpt)
    ckpt["config"]["model"]["base_channels"] = 16          # weights of another architecture
    other = str(tmp_path / "other.pt")
    save_checkpoint(other, ckpt)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(1000))
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(open(tiny_ckpt, "rb").read()[:5000])
    for path, message in ((other, "do not fit"), (str(junk), "not a readable checkpoint"),
                          (str(truncated), "not a readable checkpoint")):
        r = run_cli("sample.py", "--checkpoint", path, "--out", str(tmp_path / "x.png"))
        one_line_error(r, message, path)


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = "/tmp/sd_lora_mnist_pwned"


def test_hostile_pickle_is_refused_without_running(tmp_path):
    if os.path.exists(MARKER):
        os.remove(MARKER)
    path = tmp_path / "evil.pt"
    torch.save({"model": Evil(), "config": {}}, path)
    for script in ("sample.py", "evaluate.py"):
        r = run_cli(script, "--checkpoint", str(path), "--out" if script == "sample.py" else "--json",
                    str(tmp_path / "x"))
        one_line_error(r, str(path))
    assert not os.path.exists(MARKER), "unpickling ran code"


def test_run_folder_rules(tmp_path):
    out = str(tmp_path / "run")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        prepare_run_folder(out, resume=True, overwrite=False)
    assert prepare_run_folder(out, False, False) == []
    open(os.path.join(out, "ckpt.pt"), "w").close()
    with pytest.raises(CheckpointError, match="already holds a run"):
        prepare_run_folder(out, False, False)
    assert prepare_run_folder(out, True, False) == prepare_run_folder(out, False, True)


def test_check_outputs_resolves_paths_before_comparing(tmp_path):
    from harness.files import check_outputs
    ckpt = tmp_path / "run" / "ckpt.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"weights")
    os.symlink(tmp_path / "run", tmp_path / "alias")
    os.link(ckpt, tmp_path / "hard.pt")
    data = tmp_path / "digits"
    (data / "3").mkdir(parents=True)
    inputs, folders = {"--checkpoint": str(ckpt)}, {"--data-dir": str(data)}
    for out, message in ((ckpt, "being read"), (tmp_path / "alias" / "ckpt.pt", "being read"),
                         (tmp_path / "run" / ".." / "run" / "ckpt.pt", "being read"), (tmp_path / "hard.pt", "being read"),
                         (data / "3" / "x.png", "inside the --data-dir"), (tmp_path / "run", "existing folder"),
                         (tmp_path / "nope" / "x.png", "not writable"), (ckpt / "x.png", "not writable")):
        with pytest.raises(CheckpointError, match=message):
            check_outputs({"--out": str(out)}, inputs, folders)
    with pytest.raises(CheckpointError, match="also where --out writes"):
        check_outputs([("--out", str(tmp_path / "a.png")), ("--npz", str(tmp_path / "alias" / ".." / "a.png"))], {})
    check_outputs({"--out": str(tmp_path / "new" / "deeper" / "x.png")}, inputs, create=True)   # a run folder to be
    check_outputs({"--out": str(tmp_path / "x.png"), "--npz": None}, inputs, folders)
    assert sorted(os.listdir(tmp_path)) == ["alias", "digits", "hard.pt", "run"], "the checks wrote something"


def test_atomic_writes_use_unique_temp_names_that_keep_the_extension(tmp_path):
    import numpy as np

    from harness.files import atomic_write, temp_path
    a, b = temp_path(str(tmp_path / "s.npz"), ".npz"), temp_path(str(tmp_path / "s.npz"), ".npz")
    assert a != b and a.endswith(".npz") and os.path.basename(a).startswith(".s.npz.tmp-")
    atomic_write(str(tmp_path / "s.npz"), lambda tmp: np.savez(tmp, x=np.arange(3)), suffix=".npz")
    assert np.load(tmp_path / "s.npz")["x"].tolist() == [0, 1, 2]
    assert oct(os.stat(tmp_path / "s.npz").st_mode & 0o777) != oct(0o600), "the temp file's 0600 mode leaked"
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(a), os.path.basename(b), "s.npz"])
    import torch
    from safetensors.torch import save_file  # recreates its file as 0600 (safetensors 0.8)
    atomic_write(str(tmp_path / "a.safetensors"), lambda tmp: save_file({"w": torch.zeros(2)}, tmp), suffix=".safetensors")
    assert os.stat(tmp_path / "a.safetensors").st_mode & 0o777 == os.stat(tmp_path / "s.npz").st_mode & 0o777


def test_no_clobber_covers_every_file_a_run_writes(tmp_path):
    out = str(tmp_path / "run")
    os.makedirs(out)
    open(os.path.join(out, "loss.png"), "w").close()             # another run's figure, no checkpoint
    with pytest.raises(CheckpointError, match="already holds a run's files \\(loss.png\\) but no finetune_ckpt.pt to resume; pass --overwrite") as e:
        prepare_run_folder(out, False, False, "finetune_ckpt.pt", writes=("loss.png", "adapter.safetensors"))
    assert "--resume" not in str(e.value)          # nothing to resume: --resume would say "no checkpoint"
    prepare_run_folder(out, False, True, "finetune_ckpt.pt", writes=("loss.png",))


@pytest.mark.parametrize("kind", ["symlink", "dangling symlink", "hard link", "fifo", "folder"])
def test_a_lock_file_that_is_not_a_plain_file_of_its_own_is_refused(tmp_path, kind):
    from harness.files import RunLock
    folder, victim = tmp_path / "run", tmp_path / "victim.txt"
    folder.mkdir()
    victim.write_text("precious")
    lock = folder / ".lock"
    {"symlink": lambda: os.symlink(victim, lock), "dangling symlink": lambda: os.symlink(tmp_path / "none", lock),
     "hard link": lambda: os.link(victim, lock), "fifo": lambda: os.mkfifo(lock), "folder": lock.mkdir}[kind]()
    with pytest.raises(CheckpointError, match=r"\.lock"):
        RunLock(str(folder))
    assert victim.read_text() == "precious" and os.path.lexists(lock)
    assert not os.path.exists(tmp_path / "none")


def test_a_full_disk_while_locking_is_one_line_and_leaves_no_lock(tmp_path, monkeypatch):
    from harness.files import RunLock

    def full(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(CheckpointError, match="could not write .No space left"):
        RunLock(str(tmp_path))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []
    with RunLock(str(tmp_path)):                     # and the folder is not left locked
        pass


def test_a_failing_torch_save_is_one_line_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, {"model": {"w": torch.ones(2)}, "config": {}, "step": 1})

    def full_disk(obj, f, *args, **kwargs):          # what torch's zip writer raises when the disk fills up
        open(f, "wb").write(b"half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 258048 vs 257936")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="could not write .*unexpected pos"):
        save_checkpoint(path, {"model": {"w": torch.zeros(2)}, "config": {}, "step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1 and os.listdir(tmp_path) == ["ckpt.pt"]


def test_stale_temps_are_a_dead_writers_of_our_own_names_only(tmp_path):
    from harness.files import _new_temp, remove_stale_temps
    fd, live = _new_temp(str(tmp_path / "ckpt.pt"))          # a writer still at work: its temp is locked
    dead = [".ckpt.pt.tmp-abcd1234", ".loss.png.tmp-0123abcd.png"]
    users = ["notes.tmp", "table.tmp.csv", ".cache.tmp-abcdefgh", "ckpt.pt.tmp", ".ckpt.pt.tmp-abc", "ckpt.pt"]
    for name in dead + users:
        (tmp_path / name).write_text("x")
    os.symlink(tmp_path / "ckpt.pt", tmp_path / ".loss.png.tmp-linklink.png")   # a link: not a temp of ours
    try:
        remove_stale_temps([str(tmp_path / "ckpt.pt"), str(tmp_path / "loss.png")])
    finally:
        os.close(fd)
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(live), ".loss.png.tmp-linklink.png", *users])


def test_check_outputs_refuses_special_files_and_names_too_long(tmp_path):
    from harness.files import check_outputs, temp_path
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(CheckpointError, match="FIFO"):
        check_outputs({"--out": str(tmp_path / "fifo")}, {})
    with pytest.raises(CheckpointError, match="300 bytes long"):
        check_outputs({"--out": str(tmp_path / ("x" * 300))}, {})
    long = str(tmp_path / ("y" * 250))
    check_outputs({"--out": long}, {})                           # 250 bytes fit ...
    assert len(os.path.basename(temp_path(long, ".png"))) < 255  # ... and so does its temp file's name


def test_holds_weights_knows_checkpoints_and_adapters_by_their_bytes(tmp_path):
    """What check_outputs never writes over: torch checkpoints (zip and legacy pickle) and
    safetensors files, whatever their names; and what it does write over: a user's PNG, npz,
    JSON or text, even ones that look alike in their first bytes."""
    import json

    import numpy as np
    from safetensors.torch import save_file

    from harness.files import holds_weights
    torch.save({"w": torch.zeros(2)}, tmp_path / "a.json")
    torch.save({"w": torch.zeros(2)}, tmp_path / "legacy.png", _use_new_zipfile_serialization=False)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "c.txt"))
    (tmp_path / "r.json").write_text(json.dumps({"acc": {"x": 1}}))       # '{' as the 9th byte
    (tmp_path / "s.json").write_text('{"step":{"a": 1}}')
    (tmp_path / "b.bin").write_bytes(b"\x80abc")
    np.savez(tmp_path / "x.npz", images=np.zeros((1, 28, 28), np.uint8))
    (tmp_path / "e").write_bytes(b"")
    import pickle
    for protocol in (2, 3, 4, 5):                                        # torch.save(pickle_protocol=...) takes any
        torch.save({"w": torch.zeros(2)}, tmp_path / f"p{protocol}.pt", pickle_protocol=protocol,
                   _use_new_zipfile_serialization=False)
    (tmp_path / "p1.bin").write_bytes(pickle.dumps({"w": 1}, protocol=1))   # no 0x80 header: not a checkpoint
    weights = {n for n in os.listdir(tmp_path) if holds_weights(str(tmp_path / n))}
    assert weights == {"a.json", "legacy.png", "c.txt", "p2.pt", "p3.pt", "p4.pt", "p5.pt"}
