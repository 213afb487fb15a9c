"""Progress where work is long: trainer lines (step/total, rate, ETA), a trial's progress.json, `study status`
(objective, direction, best trial, durations, --watch), `mgbench eval`'s header, and study reports under runs/."""
from __future__ import annotations

import io
import re
from pathlib import Path

import optuna
import pytest
from conftest import STUDIES

from mgbench.cli import main as mgbench_main
from mgbench.config import train_config_from_dict
from mgbench.evaluation.cli import add_eval_parser, run_eval
from mgbench.study.cli import main as study_main
from mgbench.study.runner import Driver, InFlight
from mgbench.study.spec import load_spec
from mgbench.study.trial import PROGRESS_FILE, read_json, trial_dir, write_json
from mgbench.trainer.loop import train
from mgbench.trainer.progress import ConsoleProgress, Progress, format_duration, progress_line

pytestmark = pytest.mark.usefixtures("one_thread")  # torch on one thread (tests/conftest.py)

LINE = re.compile(r"^step (\d+)/(\d+) \((\d+)%\)  (\S+) steps/s  ETA (\S+)(  .*)?$")


def test_rate_and_eta_are_this_invocations_steps_over_its_wall_time():
    p = Progress(done=30, total=100, start=10, elapsed_s=4.0, values={"loss": 0.25})
    assert p.rate == 5.0 and p.eta_s == 14.0     # 20 steps in 4 s; 70 left at 5 steps/s
    assert progress_line(p) == "step 30/100 (30%)  5 steps/s  ETA 14s  loss=0.25"
    assert progress_line(Progress(10, 100, 10, 0.5)) == "step 10/100 (10%)  -- steps/s  ETA --"
    done = Progress(100, 100, 0, 8.0, kind="eval", values={"fid": 3.5, "fid_se": 0.1, "sweep/cfg_scale_1.00/fid": 2.0})
    assert progress_line(done) == "step 100/100 (100%)  12.5 steps/s  ETA 0s  eval: fid=3.5"
    assert [format_duration(s) for s in (0, 59.4, 68, 3599, 3725)] == ["0s", "59s", "1m08s", "59m59s", "1h02m"]


def test_plain_lines_every_nth_window_and_always_the_evaluation_and_the_end():
    out = io.StringIO()
    show = ConsoleProgress(out, every=2, bar=False)
    for step in (1, 2, 3, 4):
        show(Progress(step, 4, 0, float(step), values={"loss": 1.0 / step}))
    show(Progress(4, 4, 0, 4.0, kind="eval", values={"off_class": 0.5}))
    assert out.getvalue().splitlines() == ["step 2/4 (50%)  1 steps/s  ETA 2s  loss=0.5",
                                           "step 4/4 (100%)  1 steps/s  ETA 0s  loss=0.25",
                                           "step 4/4 (100%)  1 steps/s  ETA 0s  eval: off_class=0.5"]


def test_a_bar_on_a_terminal_counts_to_the_total():
    out = io.StringIO()
    show = ConsoleProgress(out, bar=True)
    for step in (2, 4):
        show(Progress(step, 4, 0, float(step), values={"loss": 0.5}))
    show.close()
    assert "4/4" in out.getvalue() and "\r" in out.getvalue() and "loss=0.5" in out.getvalue()


def tiny_cfg(out_dir: Path, steps: int):
    return train_config_from_dict({
        "name": "tiny", "out_dir": str(out_dir), "data": {"name": "grid2d"}, "model": {"arch": "MLP-S"},
        "objective": {"w": 1.5}, "optim": {"lr": 1e-3, "batch_size": 32},
        "train": {"steps": steps, "log_every": 2, "ckpt_every": 2, "eval_every": 0},
        "sample": {"steps": 2, "n_grid": 8}}, "test")


def test_the_trainer_reports_step_total_rate_and_eta_and_a_resume_counts_from_where_it_resumed(tmp_path):
    seen: list[Progress] = []
    out = io.StringIO()
    lines = ConsoleProgress(out, bar=False)

    def progress(p: Progress) -> None:
        seen.append(p)
        lines(p)

    hook = lambda ctx: {"score": float(ctx.step)}  # noqa: E731 - an evaluation whose value is its step
    train(tiny_cfg(tmp_path / "run", 4), eval_hook=hook, progress=progress)
    assert [(p.done, p.total, p.start, p.kind) for p in seen] == [(2, 4, 0, "train"), (4, 4, 0, "train"),
                                                                 (4, 4, 0, "eval")]
    assert seen[-1].values == {"score": 4.0} and set(seen[0].values) == {"loss"}
    text = out.getvalue().splitlines()
    parsed = [LINE.match(line) for line in text]
    assert all(parsed), text
    assert [m.group(1, 2, 3) for m in parsed] == [("2", "4", "50"), ("4", "4", "100"), ("4", "4", "100")]
    assert parsed[1].group(5) == "0s" and re.fullmatch(r"\d+s|\d+m\d\ds", parsed[0].group(5))
    assert text[-1].endswith("eval: score=4")

    seen.clear()
    train(tiny_cfg(tmp_path / "run", 6), eval_hook=hook, progress=progress)  # resume: 2 more steps
    assert [(p.done, p.total, p.start, p.kind) for p in seen] == [(6, 6, 4, "train"), (6, 6, 4, "eval")]


def test_an_evaluation_point_without_values_shows_nothing():
    """The trainer reports each evaluation point; with no evaluation hook its values are empty: no line, no bar text."""
    for bar in (False, True):
        out = io.StringIO()
        show = ConsoleProgress(out, bar=bar)
        show(Progress(4, 4, 0, 4.0, kind="eval"))
        show(Progress(4, 4, 0, 4.0, kind="eval", values={"fid/seed_0": 3.0, "fid_se": 0.1}))  # no headline value
        show.close()
        assert "eval" not in out.getvalue(), (bar, out.getvalue())


def test_train_no_eval_prints_step_lines_and_the_result_but_no_eval_line(tmp_path, capsys):
    """`mgbench train --no-eval` (its output in a log): a header, one line per logged window, the result line."""
    run = tmp_path / "run"
    settings = [f"out_dir={run}", "train.steps=4", "train.log_every=2", "optim.batch_size=32", "sample.steps=2",
                "sample.n_grid=8"]
    argv = ["train", str(STUDIES / "base" / "grid2d.yaml"), "--no-eval"]
    assert mgbench_main(argv + [a for s in settings for a in ("--set", s)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"train grid2d: 4 steps, out_dir {run}"
    steps = [LINE.match(line) for line in lines[1:-1]]
    assert all(steps) and [m.group(1, 2) for m in steps] == [("2", "4"), ("4", "4")], lines
    assert all(m.group(6).startswith("  loss=") for m in steps), lines
    assert lines[-1].startswith(f"finished at step 4: {run} (w=1.000)"), lines


SPEC = """\
name: _test_progress
extends: {base}
base:
  optim: {{batch_size: 64, lr: 2.0e-3}}
  train: {{steps: 20, log_every: 10, ckpt_every: 20, device: cpu}}
  sample: {{steps: 4, n_grid: 16}}
  eval: {{n_samples: 32}}
space:
  objective.w: {{grid: [1.0, 1.5]}}
sampler: grid
optimize: {{metric: off_class, direction: minimize}}
eval_hook: mgbench.evaluation.quick:quick_eval_hook
executor: debug
parallelism: 2
poll_s: 0.1
report: [toy]
"""


def test_a_study_shows_progress_and_status_and_renders_its_report_under_runs(tmp_path, monkeypatch, capsys):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(SPEC.format(base=STUDIES / "base" / "grid2d.yaml"))
    out = tmp_path / "runs" / "_test_progress"
    monkeypatch.chdir(tmp_path)   # the old default wrote ./reports/<study>/ here

    assert study_main(["study", "run", str(spec_file), "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    # The trainer's lines reach the job's output (debug jobs run in this process; local and SLURM jobs: their log).
    assert re.search(r"^step 10/20 \(50%\)  \S+ steps/s  ETA \S+  loss=", printed, re.M), printed
    assert re.search(r"^step 20/20 \(100%\)  \S+ steps/s  ETA 0s  eval: off_class=", printed, re.M)
    # Report items render beside the study's runs; no reports/ folder appears in the working directory.
    assert f"report: {out / 'report' / 'toy.md'}" in printed.splitlines()
    assert (out / "report" / "toy.md").is_file() and not (tmp_path / "reports").exists()

    spec = load_spec(spec_file, {"out_dir": str(out)})
    trials = optuna.load_study(study_name="_test_progress", storage=spec.storage).get_trials()
    for t in trials:
        prog = read_json(trial_dir(spec, t.number) / PROGRESS_FILE)
        assert (prog["step"], prog["total"], prog["eta_s"], prog["eval"]["step"]) == (20, 20, 0.0, 20)
        assert prog["eval"]["metrics"]["off_class"] == t.value and prog["loss"] > 0

    assert study_main(["study", "status", str(spec_file), "--out-dir", str(out), "--watch", "0.01"]) == 0
    lines = capsys.readouterr().out.splitlines()   # printed once: --watch ends with the study
    best = min(trials, key=lambda t: t.value)
    assert lines[0] == "study _test_progress: objective off_class, minimize (lower is better); 2 of 2 trials: 2 complete"
    assert lines[1].startswith(f"best so far: trial {best.number}  off_class={best.value:.4g}  w=")
    header = lines[2].split()
    assert header[:6] == ["trial", "state", "value", "params", "progress", "latest"] and header[6] == "duration"
    assert len(lines) == 5
    for line in lines[3:]:
        cells = line.split()
        t = trials[int(cells[0])]
        assert cells[1] == "COMPLETE" and "20/20" in cells
        assert f"off_class={t.value:.4g}@20" in line
        assert re.search(r"  (\d+s|\d+m\d\ds)  ", line), line

    # `study run` echoes each running trial's progress (read from its progress.json) when it moved.
    echoed: list[str] = []
    driver = Driver(spec, echoed.append)
    folder = trial_dir(spec, 0)
    write_json(folder / PROGRESS_FILE, {"step": 1200, "total": 3000, "steps_per_s": 9.8, "eta_s": 184.0,
                                        "loss": 0.41, "eval": {"step": 1000, "metrics": {"off_class": 0.125}}})
    driver.inflight[0] = InFlight(0, None, {})
    driver.show_progress(force=True)
    driver.show_progress(force=True)   # unchanged: not echoed again
    assert echoed == ["[_test_progress] trial 0: step 1200/3000 (40%)  9.8 steps/s  ETA 3m04s  off_class=0.125@1000"]


def test_eval_says_what_it_evaluates_and_counts_every_sample_it_draws(tmp_path, capsys):
    cfg = tiny_cfg(tmp_path / "run", 2)
    train(cfg)
    parser = __import__("argparse").ArgumentParser()
    add_eval_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", str(tmp_path / "run"), "--n", "32", "--cfg-sweep", "1.0", "--device", "cpu"])
    assert run_eval(args) == 0
    lines = capsys.readouterr().out.splitlines()
    ckpt = tmp_path / "run" / "checkpoints" / "ckpt_00000002.pt"
    assert lines[0] == f"eval {ckpt} (step 2, w=1.5, cpu): 32 samples x 1 sample seed(s), 64 samples to draw in all"
    done = lines.index(next(line for line in lines if line.startswith("evaluated in ")))
    shown = lines[1:done]   # a line at the first batch, then at most every 10 s, and the last
    assert all(re.fullmatch(r"sample \d+/64 \(\d+%\)  \S+ samples/s  ETA \S+", line) for line in shown), shown
    assert shown[0].startswith("sample 32/64 (50%)") and shown[-1].startswith("sample 64/64 (100%)")  # 2 passes x 32
    assert shown[-1].endswith("ETA 0s") and any(line.startswith("in_class ") for line in lines[done:])
