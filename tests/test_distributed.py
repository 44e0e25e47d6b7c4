"""torchrun + DDP on CPU (gloo, 2 processes): same optimisation as one process, rank 0 writes."""
import os

import torch
from conftest import TINY_FLAGS, run_cli, run_script

TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def test_two_processes_match_one_also_across_a_resume(tmp_path):
    """2 processes for 2 steps, then --resume to 4 under torchrun: the same losses and weights as
    1 process for 4 steps (same global batches and noise); rank 0 alone reports and writes."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    flags = [*TINY_FLAGS, "--ckpt-every", "100", "--no-figures"]
    r1 = run_cli("train.py", *flags, "--max-steps", "4", "--out", one)
    r2 = run_script(*TORCHRUN, "train.py", *flags, "--max-steps", "2", "--out", two)
    assert r1.returncode == 0 and r2.returncode == 0, r2.stderr[-3000:]
    r = run_script(*TORCHRUN, "train.py", "--resume", "--max-steps", "4", "--out", two, "--no-figures")
    assert r.returncode == 0 and r.stdout.count("resumed") == 1, r.stderr[-3000:]   # rank 0 alone says it
    assert "processes: 2" in r.stdout and "parameters agree across ranks (max difference 0)" in r.stdout
    assert r.stdout.count("trained 2 steps") == 1                         # rank 0 alone reports and writes
    assert "(step 4)" in r.stdout, "this run's steps, and where the run stands"
    assert sorted(os.listdir(two)) == ["ckpt.pt", "run.json"]
    a, b = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=True) for d in (one, two))
    assert a["step"] == b["step"] == 4 and len(a["losses"]) == len(b["losses"]) == 4
    for (s1, l1), (s2, l2) in zip(a["losses"], b["losses"]):               # same global batches and noise
        assert s1 == s2 and abs(l1 - l2) < 1e-4 * abs(l1), (s1, l1, l2)
    diffs = torch.cat([(a["model"][k] - b["model"][k]).abs().flatten() for k in a["model"]])
    assert diffs.mean() < 1e-4, diffs.mean()    # Adam can flip the sign of a ~0 gradient: tiny, rare


def test_lora_under_torchrun(tmp_path, tiny_ckpt):
    lora_out = str(tmp_path / "lora")
    r = run_script(*TORCHRUN, "lora_finetune.py", "--checkpoint", tiny_ckpt, "--max-steps", "2", "--batch-size", "16",
                   "--eval-n", "0", "--no-figures", "--out", lora_out)
    assert r.returncode == 0 and r.stdout.count("trainable") == 2, r.stderr[-3000:]   # 2 = header + saved line
    assert os.path.exists(os.path.join(lora_out, "adapter.safetensors"))
