"""bench.py's arithmetic and plumbing: medians and interleaved timing on a scripted clock, the
child command of a section, the table's ratios from known numbers, its flag checks, and the
sampling sections on the tiny model (the same images batched and unbatched)."""
import argparse
import json
import os
import subprocess

import bench
import pytest
import torch
from conftest import TINY_FLAGS, run_cli

from config import ModelConfig


class Clock:
    """A perf_counter that moves only when a scripted call runs: each call takes the next duration."""

    def __init__(self, durations):
        self.now, self.durations = 0.0, list(durations)

    def __call__(self):
        return self.now

    def work(self):
        self.now += self.durations.pop(0)


def test_timed_is_the_median_after_warm_up_and_reports_the_first_call(monkeypatch):
    clock = Clock([5.0, 7.0, 1.0, 3.0, 2.0])
    monkeypatch.setattr(bench.time, "perf_counter", clock)
    assert bench.timed(clock.work, warmup=2, reps=3) == (2.0, 5.0)
    assert clock.durations == []


def test_interleaved_times_the_step_and_four_matmuls_alternately(monkeypatch):
    clock = Clock([0.0] + [0.5, 0.1, 0.1, 0.1, 0.1, 0.3, 0.2, 0.2, 0.2, 0.2, 0.4, 0.05, 0.05, 0.05, 0.05])
    monkeypatch.setattr(bench.time, "perf_counter", clock)
    step_s, peak = bench.interleaved(clock.work, (clock.work, 1e9), reps=3)
    assert step_s == pytest.approx(0.4)                               # median of 0.5, 0.3, 0.4
    assert peak == pytest.approx(4 * 1e9 / 0.4 / 1e9)                 # median of 10, 5, 20 GFLOP/s


def test_model_config_is_the_presets_model():
    assert bench.model_config("cpu") == ModelConfig()
    gpu = bench.model_config("gpu")
    assert (gpu.base_channels, gpu.channel_mults, gpu.num_res_blocks, gpu.context_dim, gpu.ff_mult) == \
        (64, (1, 2, 2), 2, 128, 4)


def args_for(**kw):
    base = dict(device="cpu", batch=4, reps=2, n=20, preset="cpu", checkpoint="c.pt", threads=1, full_ddpm=0)
    base.update(kw)
    return argparse.Namespace(**base)


def test_run_section_passes_every_setting_to_its_child_and_reads_its_json(monkeypatch):
    seen = []

    def fake_run(cmd, **kw):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout='progress\n{"img_per_s": 12.5}\n', stderr="")
    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    assert bench.run_section("train", args_for(), mode="bf16", lora=1) == {"img_per_s": 12.5}
    cmd = seen[0]
    flags = dict(zip(cmd[2::2], cmd[3::2]))
    assert cmd[1].endswith("bench.py") and flags == {
        "--section": "train", "--device": "cpu", "--batch": "4", "--reps": "2", "--n": "20", "--preset": "cpu",
        "--checkpoint": "c.pt", "--threads": "1", "--full-ddpm": "0", "--mode": "bf16", "--lora": "1"}

    monkeypatch.setattr(bench.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, stdout="", stderr="Traceback ...\nRuntimeError: no compiler\n"))
    assert bench.run_section("train", args_for(), mode="compile") == {"error": "RuntimeError: no compiler"}


def results(**over):
    """A complete result set with round numbers."""
    R = {"machine": "test box", "device": "cpu", "preset": "cpu", "batch": 64, "n": 100,
         "matmul": {"fp32_gflops": 200.0, "bf16_gflops": 400.0},
         "train": {"eager": {"img_per_s": 500.0, "ms_per_step": 128.0, "data_ms_per_step": 0.25,
                             "first_step_s": 1.0, "optimizer_state_mb": 1.5, "peak_rss_mb": 300.0,
                             "interleaved_peak_gflops": 100.0, "gflop_per_image": 0.1},
                   "compile": {"img_per_s": 800.0, "ms_per_step": 80.0, "first_step_s": 42.0,
                               "optimizer_state_mb": 1.5, "peak_rss_mb": 900.0}},
         "lora_train": {"img_per_s": 700.0, "ms_per_step": 91.4, "optimizer_state_mb": 0.02, "peak_rss_mb": 280.0},
         "profile": {"total_ms_per_step": 120.0, "top": [{"op": "aten::conv", "self_ms_per_step": 60.0,
                                                         "share": 0.5, "calls_per_step": 12}]},
         "sample": {"ddpm1000": {"seconds": 100.0, "accuracy": None, "extrapolated": True},
                    "ddim50": {"seconds": 5.0, "accuracy": 0.99}, "ddim20": {"seconds": 2.0, "accuracy": 0.9},
                    "ddim50_unbatched": {"seconds": 6.0, "accuracy": 0.99}, "peak_rss_mb": 350.0},
         "lora_sampling": {"base": {"ms_per_call": 10.0}, "unmerged": {"ms_per_call": 12.5},
                           "merged": {"ms_per_call": 10.0}},
         "sample_cli": {"end_to_end_s": 4.0, "import_s": 2.0, "load_s": 0.05, "sample_s": 1.5}}
    R.update(over)
    return R


def test_report_prints_the_ratios_of_the_numbers_it_was_given(capsys):
    bench.report(results())
    out = capsys.readouterr().out
    assert "matmul peak fp32 200, bf16 400 GFLOP/s" in out and "0.100 GFLOP per training image" in out
    eager = [l for l in out.splitlines() if l.startswith("full, eager")][0].split()
    assert eager[2:] == ["500", "128.0", "50%", "300", "1.50"]        # util = 0.1 * 500 / 100
    compiled = [l for l in out.splitlines() if l.startswith("full, compile")][0].split()
    assert compiled[4] == "40%"                                       # no interleaved peak: fp32's 200
    lora_row = [l for l in out.splitlines() if l.startswith("LoRA qkv r4")][0].split()
    assert lora_row[-5:] == ["700", "91.4", "-", "280", "0.02"]
    assert "compile: first step (compilation) 42 s" in out
    assert "data time per step (indexing the in-memory tensor): 0.250 ms" in out
    assert "DDIM 50 is 20.0x faster than DDPM 1000; batching guidance 1.20x" in out
    assert "ddpm1000" in out and "(20 steps timed, x50)" in out and "99%" in out
    assert "merged/base 1.000, unmerged/base 1.250" in out
    assert "4.0 s end to end; in-process: imports 2.0 s, load 0.05 s, sampling 1.5 s" in out
    assert "aten::conv" in out and "50.0%" in out and "x12" in out


def test_report_reports_failed_sections_and_goes_on(capsys):
    R = results(sample={"error": "no checkpoint"}, lora_sampling={"error": "x"}, matmul={"error": "y"})
    R["train"]["compile"] = {"error": "no compiler"}
    bench.report(R)
    out = capsys.readouterr().out
    assert "full, compile" in out and "failed: no compiler" in out
    assert "sampling failed: no checkpoint" in out
    assert "matmul peak fp32 nan" in out and "merged/base" not in out


@pytest.mark.parametrize("flags, needle", [
    (["--device", "tpu"], "--device tpu"), (["--modes", "eager,warp"], "--modes"),
    (["--modes", "bf16"], "includes eager"), (["--n", "15"], "multiple of 10"), (["--reps", "0"], "--reps"),
    (["--checkpoint", "nowhere.pt"], "nowhere.pt not found")])
def test_bad_flags_are_one_usage_error(flags, needle, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        bench.main([*flags, "--json", str(tmp_path / "b.json")])
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_the_ddpm_row_is_named_and_scaled_by_the_models_T(capsys):
    """Before: a T = 50 model's rows said "ddpm1000" and "DDIM 50 is 33x faster than DDPM 1000"."""
    sample = {"ddpm50": {"seconds": 2.5, "accuracy": None, "extrapolated": True}, "T": 50,
              **{k: v for k, v in results()["sample"].items() if k != "ddpm1000"}}
    bench.report(results(sample=sample))
    out = capsys.readouterr().out
    assert "DDIM 50 is 0.5x faster than DDPM 50;" in out and "(20 steps timed, x2.5)" in out and "ddpm1000" not in out


def test_a_model_of_fewer_steps_than_the_rows_is_refused_and_no_run_means_the_shipped_model(tmp_path, capsys,
                                                                                          monkeypatch):
    run = str(tmp_path / "t30")
    assert run_cli("train.py", *TINY_FLAGS, "--timesteps", "30", "--max-steps", "1", "--no-figures",
                   "--out", run).returncode == 0
    with pytest.raises(SystemExit) as e:
        bench.main(["--checkpoint", os.path.join(run, "ckpt.pt"), "--json", str(tmp_path / "b.json")])
    assert e.value.code == 2 and "T = 30, fewer than the 50 steps the sampling rows run" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)                        # no runs/mnist here
    os.mkdir(tmp_path / "taken.json")                  # stops it at the output check, before any work
    with pytest.raises(SystemExit) as e:
        bench.main(["--json", "taken.json"])
    out, err = capsys.readouterr()
    assert "no run of yours at runs/mnist/ckpt.pt: using the shipped weights" in out and "taken.json" in err


def test_the_sampling_sections_on_the_tiny_model(tiny_ckpt, quick_judge, tmp_path, monkeypatch):
    """section_sample: guidance as two separate passes gives the same images (so the same
    accuracy) as the batched one; DDPM is 20 guided calls scaled to the model's T. lora_sampling: a time
    per model. The accuracies are the judge's on those very images."""
    os.symlink(quick_judge, tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    args = args_for(checkpoint=tiny_ckpt, n=10, reps=1)
    monkeypatch.setattr(bench, "timed", lambda fn, warmup, reps: (fn(), (0.01, None))[1])   # a guided call: 10 ms
    import evaluate
    judged, classify = [], evaluate.classify
    monkeypatch.setattr(evaluate, "classify", lambda clf, x: judged.append(x) or classify(clf, x))
    r = bench.section_sample(args, torch.device("cpu"))
    assert len(judged) == 3 and judged[1].shape == (10, 1, 28, 28)        # ddim20, ddim50, ddim50 unbatched
    assert (judged[1] - judged[2]).abs().max() < 1e-4, "guidance in one batch or two passes: the same images"
    assert (judged[0] - judged[1]).abs().max() > 1e-3, "20 steps are not 50"
    assert r["T"] == 50 and r["ddpm50"]["seconds"] == pytest.approx(0.5), "T = 50 DDPM steps of one guided call each"
    assert set(r) == {"ddim20", "ddim50", "ddim50_unbatched", "ddpm50", "T", "peak_rss_mb"}    # named by its T
    assert r["ddim50"]["accuracy"] == r["ddim50_unbatched"]["accuracy"]
    assert r["ddpm50"]["extrapolated"] and r["ddpm50"]["accuracy"] is None
    assert all(0 <= r[k]["accuracy"] <= 1 and r[k]["seconds"] > 0 for k in ("ddim20", "ddim50"))
    s = bench.section_lora_sampling(args, torch.device("cpu"))
    assert set(s) == {"base", "unmerged", "merged"} and all(v["ms_per_call"] > 0 for v in s.values())


def test_the_train_section_counts_images_per_second_and_flops(monkeypatch):
    """The train section's rows agree with each other: img/s = batch / step time, and the FLOP
    count is FlopCounterMode's of one step, per image."""
    monkeypatch.setattr(bench, "model_config", lambda preset: ModelConfig(
        base_channels=8, channel_mults=(1, 2), context_tokens=2, context_dim=16, attn_heads=2, ff_mult=1))
    r = bench.section_train(argparse.Namespace(preset="cpu", mode="eager", batch=4, lora=0, reps=2),
                            torch.device("cpu"))
    assert r["img_per_s"] == pytest.approx(4 / (r["ms_per_step"] / 1000))
    assert 0.001 < r["gflop_per_image"] < 0.1 and r["optimizer_state_mb"] > 0
    lora_r = bench.section_train(argparse.Namespace(preset="cpu", mode="eager", batch=4, lora=1, reps=2),
                                 torch.device("cpu"))
    assert "gflop_per_image" not in lora_r and lora_r["optimizer_state_mb"] < r["optimizer_state_mb"] / 10
    json.dumps(r)                                                    # what a child prints must be JSON
    _, _, data = bench.train_step_fn("eager", torch.device("cpu"), 4, bench.model_config("cpu"))
    assert data.shape == (4500, 1, 28, 28) and data.min() >= -1 and data.max() <= 1 and abs(data.mean()) < 0.01


def canned_section(name, extra):
    """What a child process would print for section `name`, from results()."""
    if name == "train":
        return results()["lora_train"] if extra.get("lora") else results()["train"]["eager"]
    return results()[{"matmul": "matmul", "profile": "profile", "sample": "sample",
                      "lora_sampling": "lora_sampling", "cli": "sample_cli"}[name]]


def fake_children(monkeypatch, run_section):
    """bench.main without child processes: sections from run_section, sample.py a success."""
    monkeypatch.setattr(bench, "run_section", run_section)
    monkeypatch.setattr(bench.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 0, "", ""))


def test_main_runs_each_section_in_order_and_writes_the_table(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """The parent process: every section once, in order, each training mode (on a CPU all but
    compile_bf16; --quick: no compile, 3 reps, 20 images), the results as JSON and the table.
    A child (--section) prints its one JSON line and nothing else."""
    calls = []

    def run_section(name, args, **extra):
        calls.append((name, extra, args.reps, args.n))
        return canned_section(name, extra)
    fake_children(monkeypatch, run_section)
    out = str(tmp_path / "bench.json")
    bench.main(["--checkpoint", tiny_ckpt, "--json", out])
    trained = [extra["mode"] for name, extra, _, _ in calls if name == "train" and not extra.get("lora")]
    assert trained == ["eager", "channels_last", "bf16", "compile"]
    assert [c[0] for c in calls] == ["matmul"] + ["train"] * 5 + ["profile", "sample", "lora_sampling", "cli"]
    assert calls[5][1] == {"mode": "channels_last", "lora": 1} and calls[0][2:] == (8, 100)
    saved = json.load(open(out))
    assert list(saved["train"]) == trained and saved["batch"] == 64 and saved["sample_cli"]["end_to_end_s"] > 0
    assert "DDIM 50 is 20.0x faster" in capsys.readouterr().out
    calls.clear()
    bench.main(["--checkpoint", tiny_ckpt, "--json", out, "--quick"])
    assert [c[1]["mode"] for c in calls if c[0] == "train" and "lora" not in c[1]] == ["eager", "channels_last", "bf16"]
    assert calls[0][2:] == (3, 20)
    capsys.readouterr()
    monkeypatch.setitem(bench.SECTIONS, "matmul", lambda args, device: {"fp32_gflops": 1.5})
    calls.clear()
    child = ["--section", "matmul", "--checkpoint", tiny_ckpt, "--json", str(tmp_path / "child.json")]
    assert bench.main(child) is None
    assert capsys.readouterr().out == '{"fp32_gflops": 1.5}\n' and calls == []
    assert not os.path.exists(tmp_path / "child.json")


def test_quick_never_overrides_a_flag_that_was_given():
    args = args_for(reps=10, n=100)
    assert bench.quick(args, ["eager", "compile"], given={"quick"}) == ["eager"]
    assert (args.reps, args.n) == (3, 20)
    args = args_for(reps=10, n=100)
    assert bench.quick(args, ["eager", "compile"], given={"quick", "reps", "n", "modes"}) == ["eager", "compile"]
    assert (args.reps, args.n) == (10, 100)


def test_an_interrupted_rerun_keeps_the_finished_results(tiny_ckpt, tmp_path, monkeypatch):
    """Before: the partial results of a rerun stopped by Ctrl-C replaced the complete --json."""
    def run_section(name, args, **extra):
        if name == "profile" and stop:
            raise KeyboardInterrupt
        return canned_section(name, extra)
    fake_children(monkeypatch, run_section)
    out, partial = tmp_path / "bench.json", tmp_path / "bench.partial.json"
    stop = False
    bench.main(["--checkpoint", tiny_ckpt, "--json", str(out), "--modes", "eager"])
    finished = out.read_bytes()
    assert "sample_cli" in json.loads(finished) and not partial.exists()
    stop = True
    r = run_cli("tools/bench.py", "--checkpoint", tiny_ckpt, "--json", str(out), "--modes", "eager")
    assert r.returncode == 130 and f"until then (and if stopped) what is measured is in {partial}" in r.stdout
    assert out.read_bytes() == finished and list(json.loads(partial.read_text())["train"]) == ["eager"]


def test_bench_threads_out_of_range_is_one_usage_line(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--threads", "-1"])
    assert e.value.code == 2 and "--threads -1: must be between 0 (torch's default) and 4096" in capsys.readouterr().err
