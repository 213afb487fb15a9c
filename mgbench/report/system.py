"""The system-level row at study scale: the best MG model without CFG against the best CFG setting of the
vanilla model, at CFG's own sampling steps and at equal NFE (network forwards per image), with IMG/S.

The paper's Tables 1-2 compare its best MG model (one forward per step) with vanilla + CFG (two). On a
`table3`-style study (MG rows over w, vanilla rows with a CFG sweep), this module:

1. picks w* = the MG w with the lowest mean final metric and s* = the CFG scale with the lowest mean metric
   of the vanilla runs' sweep (both chosen on the same runs, which favours each row equally);
2. re-evaluates every training seed's final EMA checkpoint (`mgbench eval`, K sample seeds, IMG/S in the
   same process and conditions) as: MG w* (S steps, NFE S); vanilla + CFG s* (S steps, NFE 2S); vanilla +
   CFG s* at S/2 steps (NFE S, the matched-NFE row); vanilla without guidance (S steps, NFE S);
3. writes `system.md`, `system.csv` (rows) and `system_runs.csv` (per run and sample seed), with each row's
   mean ± SE over training seeds and a paired comparison (by training seed, 95% t interval) of MG against
   each CFG row, its verdict read from the interval (report/stats.py).

Evaluations are cached as JSON under `--runs-dir` (default: the study's out_dir/system), so a rerun only
renders; delete a file to re-evaluate it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

METRICS = ("fid", "is", "precision", "recall")   # reported with their SE; img_per_s is one number per evaluation


@dataclass(frozen=True)
class Trial:
    """A finished trial of the study: its folder, training seed, w and final metrics."""

    path: Path
    seed: int
    w: float
    formulation: str   # flow (SiT) | diffusion (DiT)
    metrics: dict[str, float]


@dataclass(frozen=True)
class Setting:
    """One row: which trials, sampled how."""

    key: str          # cache folder name
    label: str        # the row's words
    group: str        # mg | vanilla (which trials)
    guidance: str     # sample.guidance
    scale: float      # sample.cfg_scale (cfg) / 0
    steps: int        # sampling steps
    nfe: int          # network forwards per image


def load_trials(out_dir: Path) -> list[Trial]:
    """The study's finished trials (trial.json config + result.json metrics) under out_dir/trials."""
    found = []
    for folder in sorted((out_dir / "trials").glob("[0-9]*")):
        result_file, trial_file = folder / "result.json", folder / "trial.json"
        if not (result_file.is_file() and trial_file.is_file()):
            continue
        result = json.loads(result_file.read_text())
        if result.get("status") != "finished":
            continue
        cfg = json.loads(trial_file.read_text())["config"]
        found.append(Trial(folder, int(cfg["train"]["seed"]), float(cfg["objective"]["w"]),
                           str(cfg["objective"].get("formulation", "diffusion")), result["metrics"]))
    return found


def _mean(values: list[float]) -> float:
    """Mean of the finite values (nan when none)."""
    v = [x for x in values if x is not None and math.isfinite(x)]
    return sum(v) / len(v) if v else math.nan


def choose(trials: list[Trial], metric: str = "fid") -> tuple[float, float]:
    """(w*, s*): the MG w and the vanilla runs' CFG scale with the lowest mean `metric` over training seeds."""
    ws = sorted({t.w for t in trials if t.w != 1.0})
    if not ws:
        raise ValueError("no MG trials (w != 1) have finished")
    w_star = min(ws, key=lambda w: _mean([t.metrics.get(metric) for t in trials if t.w == w]))
    vanilla = [t for t in trials if t.w == 1.0]
    prefix, suffix = "sweep/cfg_scale_", f"/{metric}"
    scales = sorted({float(k[len(prefix):-len(suffix)]) for t in vanilla for k in t.metrics
                     if k.startswith(prefix) and k.endswith(suffix)})
    if not scales:
        raise ValueError(f"the vanilla trials (w = 1) have no CFG sweep ({prefix}S{suffix})")
    s_star = min(scales, key=lambda s: _mean([t.metrics.get(f"{prefix}{s:.2f}{suffix}") for t in vanilla]))
    return w_star, s_star


def settings(w_star: float, s_star: float, steps: int) -> list[Setting]:
    """The four rows: MG w*, vanilla + CFG s* at S and at S/2 steps, vanilla without guidance."""
    half = max(1, steps // 2)
    return [
        Setting(f"mg_w{w_star:.2f}_{steps}", f"MG w={w_star:.2f}, no CFG", "mg", "auto", 0.0, steps, steps),
        Setting(f"cfg_s{s_star:.2f}_{steps}", f"vanilla + CFG s={s_star:.2f}", "vanilla", "cfg", s_star, steps,
                2 * steps),
        Setting(f"cfg_s{s_star:.2f}_{half}", f"vanilla + CFG s={s_star:.2f}, {half} steps (equal NFE)", "vanilla",
                "cfg", s_star, half, 2 * half),
        Setting(f"vanilla_{steps}", "vanilla, no guidance", "vanilla", "none", 0.0, steps, steps),
    ]


def eval_command(trial: Trial, s: Setting, n: int, k: int, out: Path) -> list[str]:
    """The `mgbench eval` command line of one (trial, setting) evaluation."""
    cmd = [sys.executable, "-m", "mgbench", "eval", str(trial.path), "--n", str(n), "--steps", str(s.steps),
           "--metrics", "fid", "is", "prc", "img_per_s", "--cfg-sweep", "--set", f"eval.sample_seeds={k}",
           "--set", "eval.w_sweep=[]", "--set", f"sample.guidance={s.guidance}", "--json", str(out)]
    if s.guidance == "cfg":
        cmd += ["--set", f"sample.cfg_scale={s.scale}"]
    return cmd


def evaluate_all(trials: list[Trial], rows: list[Setting], runs_dir: Path, n: int, k: int,
                 echo=print) -> dict[tuple[str, int], dict[str, float]]:
    """{(setting key, seed): metrics}, evaluating what is not cached under runs_dir/<key>/seed_<seed>.json."""
    found = {}
    for s in rows:
        for t in sorted((t for t in trials if (t.w == 1.0) == (s.group == "vanilla")
                         and (s.group == "vanilla" or f"w{t.w:.2f}_" in s.key)), key=lambda t: t.seed):
            out = runs_dir / s.key / f"seed_{t.seed}.json"
            if not out.is_file():
                out.parent.mkdir(parents=True, exist_ok=True)
                echo(f"evaluate {s.label}, training seed {t.seed}: {t.path}")
                env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
                subprocess.run(eval_command(t, s, n, k, out), check=True, env=env, stdout=subprocess.DEVNULL)
                record = json.loads(out.read_text())
                record["load_1m"] = os.getloadavg()[0]   # how busy the machine was while IMG/S was timed
                out.write_text(json.dumps(record, indent=2, sort_keys=True))
            found[(s.key, t.seed)] = json.loads(out.read_text())
    return found


def run_table(rows: list[Setting], found: dict[tuple[str, int], dict[str, float]]) -> pd.DataFrame:
    """One line per (setting, training seed, sample seed) with every metric (img_per_s per evaluation)."""
    import pandas as pd

    lines = []
    for (key, seed), m in sorted(found.items()):
        k = int(m.get("n_sample_seeds", 1))
        for j in range(k):
            line = {"setting": key, "training_seed": seed, "sample_seed": j, "img_per_s": m.get("img_per_s")}
            line.update({name: m.get(f"{name}/seed_{j}", m.get(name)) for name in METRICS})
            lines.append(line)
    return pd.DataFrame(lines)


def summarise(rows: list[Setting], per_run: pd.DataFrame) -> pd.DataFrame:
    """Each setting's mean ± SE over training seeds (of per-run means over sample seeds) per metric."""
    import pandas as pd

    from mgbench.report import stats

    out = []
    for s in rows:
        part = per_run[per_run.setting == s.key]
        runs = part.groupby("training_seed").mean(numeric_only=True)
        k = int(part.groupby("training_seed").size().max()) if len(part) else 0
        line = {"setting": s.label, "key": s.key, "steps": s.steps, "nfe": s.nfe, "n": f"{len(runs)}x{k}"}
        for name in (*METRICS, "img_per_s"):
            e = stats.estimate(list(runs[name]) if name in runs else [], k=k)
            line[name], line[f"{name}_se"] = e.mean, e.se
        out.append(line)
    return pd.DataFrame(out)


def comparisons(rows: list[Setting], per_run: pd.DataFrame, metric: str = "fid") -> list[dict[str, Any]]:
    """MG against each CFG row: A - B with a 95% interval paired by training seed, and the verdict."""
    from mgbench.report import stats

    means = per_run.groupby(["setting", "training_seed"]).mean(numeric_only=True)
    mg, out = rows[0], []
    a = {s: v for (key, s), v in means[metric].items() if key == mg.key}
    a_ips = {s: v for (key, s), v in means["img_per_s"].items() if key == mg.key}
    for other in rows[1:3]:
        b = {s: v for (key, s), v in means[metric].items() if key == other.key}
        b_ips = {s: v for (key, s), v in means["img_per_s"].items() if key == other.key}
        if not a or not b:
            continue
        d = stats.compare(a, b)
        ratio = _mean([a_ips[s] / b_ips[s] for s in a_ips if s in b_ips])
        out.append({"a": mg.label, "b": other.label, "metric": metric, "diff": d.diff, "low": d.low,
                    "high": d.high, "paired": d.paired, "verdict": stats.verdict(d, "better", True),
                    "img_per_s_ratio": ratio})
    return out


def _pm(mean: float, se: float) -> str:
    """`mean ± se`, both to the second significant digit of the SE (the tables' rule, report.render.decimals)."""
    from mgbench.report.render import DASH, PM, decimals

    if not math.isfinite(mean):
        return DASH
    if not math.isfinite(se) or se == 0:
        return f"{mean:.3g}"
    digits = decimals(se, 0)
    return f"{mean:.{digits}f} {PM} {se:.{digits}f}"


def markdown(title: str, table: pd.DataFrame, comps: list[dict[str, Any]], w_star: float, s_star: float,
             n: int, load: str) -> str:
    """The system.md text: the rows, the comparisons and what every column means."""
    lines = [f"### System-level: best MG against best CFG ({title})", "",
             "| Sampling | Steps | NFE | Runs | FID ↓ | IS ↑ | Prec. ↑ | Rec. ↑ | IMG/S ↑ |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in table.to_dict("records"):
        cells = [_pm(r[m], r[f"{m}_se"]) for m in (*METRICS, "img_per_s")]
        lines.append(f"| {r['setting']} | {r['steps']} | {r['nfe']} | {r['n']} | " + " | ".join(cells) + " |")
    lines += ["", "| A | B | FID A - B | 95% CI | A better than B? | IMG/S A / B |", "|---|---|---:|---|---|---:|"]
    for c in comps:
        lines.append(f"| {c['a']} | {c['b']} | {c['diff']:+.3f} | [{c['low']:+.3f}, {c['high']:+.3f}]"
                     f"{' (paired)' if c['paired'] else ''} | {c['verdict']} | {c['img_per_s_ratio']:.2f} |")
    lines += ["",
              f"- w* = {w_star:.2f} and s* = {s_star:.2f} are the MG w and the CFG scale (of the vanilla runs' sweep) "
              "with the lowest mean FID in the study's own evaluation; both are chosen on the same runs.",
              f"- Every row re-evaluates the final EMA checkpoints of the study's training seeds with {n} samples per "
              "sample seed; Runs = training seeds x sample seeds; ± is one SE over training seeds (report/stats.py).",
              "- NFE = network forwards per image: MG and unguided sampling one per step, CFG two. The equal-NFE row "
              "gives CFG half the steps, so both methods spend the same compute per image.",
              "- IMG/S: images per second of sampling in the same process and batch, one number per evaluation "
              f"(machine load while measuring: {load}); its ratio, not its value, carries over to other hardware.",
              "- Comparison: A - B of FID with a 95% t interval paired by training seed; `holds` when the whole "
              "interval favours MG, `does not hold` when it favours CFG, else `not resolved at this n`.",
              "- Per run and sample seed: system_runs.csv."]
    return "\n".join(lines) + "\n"


def build(spec_path: str, out: Path, runs_dir: Path | None, n: int | None, k: int, echo=print) -> Path:
    """Evaluate (what is not cached) and write system.md / .csv / _runs.csv into `out`; returns system.md."""
    from mgbench.study.spec import load_spec

    spec = load_spec(spec_path)
    out_dir = Path(spec.out_dir)
    trials = load_trials(out_dir)
    if not trials:
        raise FileNotFoundError(f"{spec_path}: no finished trials under {out_dir}/trials (run the study first: "
                                f"mgbench study run {spec_path})")
    steps = int(spec.base.get("sample", {}).get("steps") or 50)
    n = n or int(spec.base.get("eval", {}).get("n_samples") or 1000)
    w_star, s_star = choose(trials)
    rows = settings(w_star, s_star, steps)
    found = evaluate_all(trials, rows, runs_dir or out_dir / "system", n, k, echo)
    per_run = run_table(rows, found)
    table = summarise(rows, per_run)
    comps = comparisons(rows, per_run)
    out.mkdir(parents=True, exist_ok=True)
    stem = "system_" + ("sit" if trials[0].formulation == "flow" else "dit")
    table.to_csv(out / f"{stem}.csv", index=False)
    per_run.to_csv(out / f"{stem}_runs.csv", index=False)
    load = timing_load(found)
    (out / f"{stem}.md").write_text(markdown(spec.name, table, comps, w_star, s_star, n, load))
    return out / f"{stem}.md"


def timing_load(found: dict[tuple[str, int], dict[str, float]]) -> str:
    """What the machine load says about the IMG/S column: its range over the evaluations, and whether to trust it."""
    loads = [m.get("load_1m") for m in found.values()]
    cores = os.cpu_count() or 1
    if any(x is None for x in loads):
        return "not recorded for every evaluation, so IMG/S and its ratio are unreliable here"
    text = f"1-minute load average {min(loads):.1f}-{max(loads):.1f} on {cores} cores"
    if max(loads) > cores:
        text += "; more runnable work than cores, so IMG/S and its ratio are unreliable here"
    return text


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `mgbench report system`."""
    p.add_argument("--runs-dir", default=None,
                   help="system: cache of its evaluations (default: the study's out_dir/system)")
    p.add_argument("--n", type=int, default=None,
                   help="system: samples per sample seed (default: the study's eval.n_samples)")
    p.add_argument("--sample-seeds", type=int, default=3, help="system: sample seeds per evaluation (default 3)")


def main(argv: list[str] | None = None) -> int:
    """`python -m mgbench.report.system --study SPEC --out DIR`."""
    p = argparse.ArgumentParser(prog="mgbench report system", description=__doc__.split("\n\n")[0])
    p.add_argument("--study", required=True, help="a table3-style study spec (MG w grid + vanilla with cfg_sweep)")
    p.add_argument("--out", required=True, help="folder for system_<formulation>.md/.csv")
    add_arguments(p)
    a = p.parse_args(argv)
    try:
        path = build(a.study, Path(a.out), Path(a.runs_dir) if a.runs_dir else None, a.n, a.sample_seeds)
    except (FileNotFoundError, ValueError) as e:
        print(f"mgbench report system: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
