"""Which layers, which rank? `python tools/lora_table.py --style italic` runs lora_finetune.py once per
row (target preset x rank) and tabulates trainable parameters vs style shift vs accuracy.

Every row trains for the same steps with the same data and seed, with alpha = r (scaling 1),
and is judged by evaluate.py's style measures. A row already finished with the same flags is
read, not re-run, so an interrupted table continues where it stopped; changed flags re-run it.
Flags it does not know (--epochs, --lr, ...) are passed on to lora_finetune.py. About 5
minutes per row on 2 CPU cores.
"""
import os  # isort:skip
import sys  # isort:skip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the project's modules
sys.path.insert(0, ROOT)
import harness  # noqa: F401  isort:skip -- first: Ctrl-C while the rest imports is one line

import json
import re
import signal
import subprocess

from config import MAX_IMAGES
from harness.cli import Parser, UsageError, run_cli
from harness.files import (DEFAULT_CHECKPOINT, CheckpointError, check_outputs, file_digest, load_checkpoint,
                           pyplot, save_figure, write_json)

ROWS = "attn:1,attn:4,attn:16,attn+ff:4,all-linear:4"
# what each row's command sets itself: passed-through flags may not change them
ROW_FLAGS = {"--style", "--targets", "--r", "--alpha", "--eval-n", "--checkpoint", "--out", "--resume", "--overwrite",
             "--figures", "--no-figures", "--dataset", "--style-dir", "--full"}


class TableError(UsageError):
    """A row that failed; the message says which."""


def parse_rows(text):
    """'attn:4,attn+ff:4' -> [("attn", 4), ("attn+ff", 4)]."""
    rows = []
    for item in text.split(","):
        targets, _, r = item.partition(":")
        if not targets or not r.isdigit() or int(r) < 1:
            raise ValueError(f"bad row {item!r}: expected TARGETS:RANK, e.g. attn:4")
        if (targets, int(r)) in rows:
            raise ValueError(f"row {targets}:{r} listed twice")
        rows.append((targets, int(r)))
    return rows


def run_row(targets, r, args, extra):
    """Fine-tune one row (unless already done: the same flags on the same base weights) and
    return its summary.json."""
    out = os.path.join(args.out, row_folder(targets, r))
    summary, flags_file = os.path.join(out, "summary.json"), os.path.join(out, "row_flags.json")
    started_file = os.path.join(out, "row_started.json")
    flags = ["--style", args.style, "--targets", targets, "--r", str(r), "--alpha", str(r),
             "--eval-n", str(args.eval_n), "--checkpoint", os.path.abspath(args.checkpoint)]
    row = {"flags": flags + same_flags(extra),                 # --steps=2 and --steps 2: the same row
           "base_sha256": file_digest(args.checkpoint)}       # a base retrained in place: a new row
    flags += extra
    found = read_json(summary)
    if complete(found) and found["config"]["lora"] != {**found["config"]["lora"], "targets": targets, "r": r,
                                                       "style": args.style}:
        raise TableError(f"{out} holds a fine-tuning run of other settings than row {targets} r={r}, {args.style} "
                         f"({found['config']['lora']['targets']} r={found['config']['lora']['r']}, "
                         f"{found['config']['lora']['style']}); move it away, or choose another --out")
    if os.path.lexists(os.path.join(out, "run.json")) and read_json(started_file) is None:
        raise TableError(f"{out} holds a fine-tuning run this table did not start; move it away, or choose "
                         "another --out")
    if not (read_json(flags_file) == row and complete(found)):    # new, unfinished or changed
        # this row's run, stopped after it replaced an earlier run's files (before: an older finished run's
        # checkpoint, whose --overwrite had not happened yet, was resumed as if it were this row's)
        interrupted = (read_json(started_file) == row and not complete(found)
                       and os.path.isfile(os.path.join(out, "finetune_ckpt.pt")))
        cmd = [sys.executable, os.path.join(ROOT, "lora_finetune.py"), *flags, "--out", out,
               "--resume" if interrupted else "--overwrite", "--no-figures"]
        print(f"== {targets} r={r}: {' '.join(cmd[1:])}", flush=True)
        if not interrupted:
            write_json(started_file, row)                  # before the row starts: it may be stopped at any point
        code = run_child(cmd)
        if code in (130, 143) or code < 0:            # Ctrl-C, SIGTERM (its checkpoint is saved) or killed
            raise TableError(f"row {targets} r={r} was interrupted; run the same command again to continue it")
        if code != 0:
            raise TableError(f"row {targets} r={r} failed (its error is above); fix that, then run the table again")
        if not complete(read_json(summary)):
            raise TableError(f"row {targets} r={r}: {summary} is not a fine-tuning summary with an evaluation")
        write_json(flags_file, row)
    return read_json(summary)


def same_flags(words):
    """Passed-through flags as one spelling: "--steps=2" -> "--steps", "2" (what argparse reads alike)."""
    return [w for word in words for w in (word.split("=", 1) if word.startswith("--") and "=" in word else [word])]


def complete(summary):
    """True when summary (read from a row's summary.json) holds everything the table shows."""
    try:
        ev, lora = summary["evaluation"], summary["config"]["lora"]
        if not (isinstance(lora, dict) and isinstance(lora.get("r"), int) and isinstance(lora.get("targets"), str)):
            return False
        numbers = [summary[k] for k in ("trainable", "total_params", "file_bytes", "ms_per_step")]
        numbers += [ev["shift"]["ink"], ev["shift"]["slant"], ev["rows"]["fine-tuned model"]["accuracy"]]
        return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers)
    except (TypeError, KeyError):
        return False


def run_child(cmd):
    """Run cmd to its end -> exit code. On Ctrl-C (which the child gets too) wait for the child to
    save its checkpoint, then stop: subprocess.run would kill it a quarter of a second later. A
    SIGTERM to this process (kill PID) goes on to the child, which saves and stops the same way."""
    child = subprocess.Popen(cmd)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signal.SIGTERM))
    try:
        return child.wait()
    except KeyboardInterrupt:
        child.wait()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def row_folder(targets, r):
    """A row's folder name: the targets (a preset, or regexes made file-name safe) and the rank."""
    return re.sub(r"[^A-Za-z0-9+.-]+", "_", targets).strip("_") + f"-r{r}"


def read_json(path):
    """The JSON in path, or None if there is none (a row never finished)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError, RecursionError):
        return None


def measure_of(style):
    """The measure a style moves: stroke ink for bold, slant for italic."""
    return "ink" if style == "bold" else "slant"


def table_rows(summaries, style):
    """One dict per row with the numbers the table shows."""
    rows = []
    for (targets, r), s in summaries:
        ev = s["evaluation"]
        rows.append({"targets": targets, "r": r, "trainable": s["trainable"],
                     "fraction": s["trainable"] / s["total_params"], "adapter_kib": s["file_bytes"] / 1024,
                     "ink_shift": ev["shift"]["ink"], "slant_shift": ev["shift"]["slant"],
                     "accuracy": ev["rows"]["fine-tuned model"]["accuracy"], "ms_per_step": s["ms_per_step"]})
    return rows


def print_table(rows, style):
    """Markdown, ready for the README."""
    measure = measure_of(style)
    print(f"| targets | rank | trainable params | % of model | adapter | {measure} shift | accuracy |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for w in rows:
        print(f"| {w['targets']} | {w['r']} | {w['trainable']:,} | {100 * w['fraction']:.1f}% | "
              f"{w['adapter_kib']:.0f} KiB | {100 * w[measure + '_shift']:.0f}% | {100 * w['accuracy']:.1f}% |")


def plot(rows, style, path):
    """Style shift against trainable parameters (log scale), one labelled point per row."""
    plt = pyplot()
    measure = measure_of(style)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for i, w in enumerate(sorted(rows, key=lambda w: w["trainable"])):
        point = (w["trainable"], 100 * w[measure + "_shift"])
        ax.scatter(*point, color="C0" if w["targets"] == "attn" else "C1")
        ax.annotate(f"{w['targets']} r{w['r']}", point, fontsize=7, xytext=(5, 6 if i % 2 else -11),
                    textcoords="offset points")
    ax.axhline(80, color="gray", lw=0.8, ls="--")
    budget = 0.03 * rows[0]["trainable"] / rows[0]["fraction"]                # 3% of the model
    ax.axvline(budget, color="gray", lw=0.8, ls=":")
    ax.text(budget, ax.get_ylim()[0], " 3% of the model", fontsize=7, color="gray", va="bottom")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(f"{measure} shift, base -> real {style} (%)")
    ax.set_title(f"LoRA on {style} digits: where and how big")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def main(argv=None):
    p = Parser(description="LoRA target presets x ranks: trainable parameters vs style shift vs accuracy.")
    p.add_argument("--style", choices=["bold", "italic"], default="italic", help="built-in style (default: italic)")
    p.add_argument("--rows", default=ROWS, help=f"TARGETS:RANK list (default: {ROWS})")
    p.add_argument("--eval-n", type=int, default=10, help="samples per digit judged per row (default: 10)")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="base model")
    p.add_argument("--out", default="", help="folder of the rows (default: runs/lora-table-STYLE)")
    args, extra = p.parse_known_args(argv)
    try:
        rows = parse_rows(args.rows)
    except ValueError as e:
        p.error(str(e))
    taken = sorted({w.split("=")[0] for w in extra if w.split("=")[0] in ROW_FLAGS})
    if taken:                                         # passed on, they would silently override each row's own
        p.error(f"{', '.join(taken)}: set by each row (--rows TARGETS:RANK, alpha = r) or by this script; "
                "drop them")
    if not 1 <= args.eval_n <= MAX_IMAGES // 10:            # the bound lora_finetune.py would refuse beyond
        p.error(f"--eval-n must be between 1 and {MAX_IMAGES // 10:,}")
    args.out = args.out or os.path.join("runs", f"lora-table-{args.style}")
    try:                                   # before any work: the table may not land on the base model
        check_outputs([("--out", os.path.join(args.out, n)) for n in ("table.json", "table.png")],
                      {"--checkpoint": args.checkpoint}, create=True)
        load_checkpoint(args.checkpoint)   # a missing base is one line here, not a failed row and its output
    except CheckpointError as e:
        p.error(str(e))
    summaries = [((t, r), run_row(t, r, args, extra)) for t, r in rows]
    rows = table_rows(summaries, args.style)
    print_table(rows, args.style)
    write_json(os.path.join(args.out, "table.json"), rows)
    plot(rows, args.style, os.path.join(args.out, "table.png"))
    print(os.path.join(args.out, "table.png"))


if __name__ == "__main__":
    sys.exit(run_cli(main))
