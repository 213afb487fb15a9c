"""Tidy runs -> the paper's Figures 2, 4, 5 and 6 (seaborn; PNG and PDF); each returns the data it plotted."""
from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mgbench import tracking as T
from mgbench.report import load as L
from mgbench.report.specs import _w_setting, model_label, uses_cfg
from mgbench.report.stats import estimate

FID, IS = T.metric_eval("fid"), T.metric_eval("is")
# Fixed metadata so the same data gives the same bytes (no dates, no version strings).
PNG_META = {"Software": None}
PDF_META = {"Creator": None, "Producer": None, "CreationDate": None, "ModDate": None}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper")
    return plt, sns


def save_figure(fig: Any, out_dir: str | Path, stem: str) -> list[Path]:
    """Write `<stem>.png` and `<stem>.pdf` with fixed metadata; close the figure."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.png", out / f"{stem}.pdf"]
    fig.savefig(paths[0], dpi=150, metadata=PNG_META, bbox_inches="tight")
    fig.savefig(paths[1], metadata=PDF_META, bbox_inches="tight")
    fig.clf()
    _plt()[0].close(fig)
    return paths


def method_label(row: dict[str, Any]) -> str:
    """How a run's sampling is named in a legend: vanilla, CFG s=1.00, MG w=1.50, MG w=1.50 + CFG s=0.50."""
    cfg = f"CFG s={float(row.get(L.P_CFG_SCALE) or 0.0):.2f}" if uses_cfg(row) else ""
    if row[L.VARIANT] == "vanilla":
        return cfg or "vanilla"
    mg = "MG " + _w_setting(row)
    return f"{mg} + {cfg}" if cfg else mg


def _finished(runs: pd.DataFrame) -> list[dict[str, Any]]:
    done = runs[runs[L.STATUS] == "finished"]
    return done.astype(object).where(done.notna(), None).to_dict("records")


def _model(row: dict[str, Any]) -> str:
    return model_label(row.get(L.P_ARCH), row.get(L.P_FORMULATION))


# ----------------------------------------------------------------------------- Figure 4


def fig4_data(runs: pd.DataFrame) -> pd.DataFrame:
    """FID and IS against the CFG scale, per model and training variant: mean and SE over runs (report.stats)."""
    pattern = L.sweep_pattern()
    sweeps = [(c, pattern.match(c)) for c in runs.columns]
    sweeps = [(c, float(m["scale"]), m["metric"]) for c, m in sweeps if m and m["metric"] in ("fid", "is")]
    points = []
    for row in _finished(runs):
        own = float(row.get(L.P_CFG_SCALE) or 0.0) if uses_cfg(row) else 0.0
        seen = set()
        for col, scale, metric in sweeps:
            if row.get(col) is not None:
                points.append((row, scale, metric, row[col], row.get(T.metric_se(col))))
                seen.add((scale, metric))
        for metric, col in (("fid", FID), ("is", IS)):
            if row.get(col) is not None and (own, metric) not in seen:
                points.append((row, own, metric, row[col], row.get(T.metric_se(col))))
    columns = ["model", "scale", "variant", "training", "cfg_scale", "metric", "value", "run_se", "k"]
    data = pd.DataFrame([{"model": _model(r), "scale": r.get(T.TAG_SCALE) or "", "variant": r[L.VARIANT],
                          "training": "vanilla" if r[L.VARIANT] == "vanilla" else "MG " + _w_setting(r),
                          "cfg_scale": s, "metric": m, "value": float(v), "run_se": np.nan if se is None else float(se),
                          "k": int(r.get(T.M_SAMPLE_SEEDS) or 1)} for r, s, m, v, se in points], columns=columns)
    keys = ["model", "scale", "variant", "training", "metric", "cfg_scale"]
    rows = []
    for key, part in data.groupby(keys, sort=True):
        est = estimate(part["value"].tolist(), part["run_se"].tolist(), int(part["k"].min()))
        rows.append({**dict(zip(keys, key)), "mean": est.mean, "se": est.se, "n": est.n_runs})
    return pd.DataFrame(rows, columns=[*keys, "mean", "se", "n"])


def fig4(runs: pd.DataFrame, out_dir: str | Path) -> pd.DataFrame:
    """Figure 4: FID and IS against the CFG scale; CFG on a vanilla model vs CFG on top of an MG model (bars: SE)."""
    data = fig4_data(runs)
    plt, sns = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, metric, name in zip(axes, ("fid", "is"), ("FID", "IS")):
        part = data[data["metric"] == metric]
        if not part.empty:
            sns.lineplot(part, x="cfg_scale", y="mean", hue="training", style="model", marker="o", ax=ax,
                         errorbar=None)
            bars = part.dropna(subset=["se"])        # mean +- SE over runs (sampling-only SE for one run)
            ax.errorbar(bars["cfg_scale"], bars["mean"], yerr=bars["se"], fmt="none", ecolor="0.4", capsize=2, lw=0.8)
        ax.set(xlabel="CFG scale s (pred = cond + s (cond - uncond))", ylabel=name, title=f"{name} against CFG scale")
    fig.tight_layout()
    save_figure(fig, out_dir, "fig4_cfg_scale")
    return data


# ----------------------------------------------------------------------------- Figure 5


def fig5_data(runs: pd.DataFrame, histories: dict[str, list[tuple[int, float]]]) -> pd.DataFrame:
    """FID against training step per model and method (mean over seeds), from `eval/fid` histories by run id."""
    points = [{"model": _model(r), "scale": r.get(T.TAG_SCALE) or "", "variant": r[L.VARIANT],
               "method": method_label(r), "step": int(s), "fid": float(v)}
              for r in _finished(runs) for s, v in histories.get(r[L.RUN_ID], [])]
    data = pd.DataFrame(points, columns=["model", "scale", "variant", "method", "step", "fid"])
    return data.groupby(["model", "scale", "variant", "method", "step"], sort=True)["fid"].mean().reset_index()


def steps_to_reach(steps: np.ndarray, fid: np.ndarray, target: float) -> float | None:
    """The first training step where a FID curve reaches `target` (linear between evaluations); None if never."""
    below = np.nonzero(fid <= target)[0]
    if len(below) == 0:
        return None
    i = below[0]
    if i == 0:
        return float(steps[0])
    s0, s1, f0, f1 = steps[i - 1], steps[i], fid[i - 1], fid[i]
    return float(s0 + (s1 - s0) * (f0 - target) / (f0 - f1))


def speedups(data: pd.DataFrame) -> pd.DataFrame:
    """Per model and MG method: vanilla's final FID, the step MG reaches it, and the speed-up (vanilla steps / MG)."""
    rows = []
    for (model, scale), part in data.groupby(["model", "scale"], sort=True):
        vanilla = part[part["method"] == "vanilla"].sort_values("step")
        if vanilla.empty:
            continue
        target, last = float(vanilla["fid"].iloc[-1]), float(vanilla["step"].iloc[-1])
        for method, mg in part[part["variant"] == "mg"].groupby("method", sort=True):
            mg = mg.sort_values("step")
            reach = steps_to_reach(mg["step"].to_numpy(), mg["fid"].to_numpy(), target)
            rows.append({"model": model, "scale": scale, "method": method, "vanilla_final_fid": target,
                         "vanilla_steps": last, "mg_steps_to_reach": reach,
                         "speedup": last / reach if reach else None})
    return pd.DataFrame(rows, columns=["model", "scale", "method", "vanilla_final_fid", "vanilla_steps",
                                       "mg_steps_to_reach", "speedup"])


def metric_histories(tracking_uri: str | None | dict[str, str | None], run_ids: list[str],
                     metric: str = FID) -> dict[str, list[tuple[int, float]]]:
    """(step, value) history of one metric per run, from MLflow (one URI, or a URI per run id)."""
    stores: dict[str | None, T.RunStore] = {}
    out = {}
    for run_id in run_ids:
        uri = tracking_uri.get(run_id) if isinstance(tracking_uri, dict) else tracking_uri
        out[run_id] = stores.setdefault(uri, T.RunStore(uri)).history(run_id, metric)
    return out


def fig5(runs: pd.DataFrame, tracking_uri: str | None | dict[str, str | None], out_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Figure 5: FID against training steps, vanilla vs MG, with the speed-up to reach vanilla's final FID."""
    histories = metric_histories(tracking_uri, runs.loc[runs[L.STATUS] == "finished", L.RUN_ID].tolist())
    data = fig5_data(runs, histories)
    gains = speedups(data)
    plt, sns = _plt()
    models = sorted(data["model"].unique()) or [""]
    fig, axes = plt.subplots(1, len(models), figsize=(5.0 * len(models), 4.6), squeeze=False)
    for ax, model in zip(axes[0], models):   # one panel per model: MG at each w against vanilla
        part = data[data["model"] == model]
        if not part.empty:
            sns.lineplot(part, x="step", y="fid", hue="method", marker="o", ax=ax, errorbar=None)
            ax.set_yscale("log")
        lines = []
        for g in gains[gains["model"] == model].to_dict("records"):
            if lines == []:
                lines.append(f"vanilla's final FID ({g['vanilla_final_fid']:.2f}, step {g['vanilla_steps']:.0f}):")
            reached = pd.notna(g["speedup"]) and g["speedup"]
            lines.append(f"  {g['method']}: at step {g['mg_steps_to_reach']:.0f}, {g['speedup']:.1f}x faster"
                         if reached else f"  {g['method']}: not reached")
        ax.text(0.0, -0.18, "\n".join(lines), transform=ax.transAxes, ha="left", va="top", fontsize=7)
        ax.set(xlabel="training step", ylabel="FID (log scale)", title=f"{model}: FID against training steps")
    fig.tight_layout()
    save_figure(fig, out_dir, "fig5_convergence")
    return data, gains


# ----------------------------------------------------------------------------- Figure 6


def fig6_data(runs: pd.DataFrame) -> pd.DataFrame:
    """FID against parameters and against sampling GFLOPs (gflops_per_forward * nfe), per model and method: the mean
    over training seeds with its SE and n (report.stats.estimate: one run gives its SE over sample seeds)."""
    rows = [{"model": _model(r), "variant": r[L.VARIANT], "method": method_label(r),
             "n_params": r.get(T.M_PARAMS), "sampling_gflops": (r.get(T.M_GFLOPS) or np.nan) * (r.get(T.M_NFE) or np.nan),
             "fid": r.get(FID), "run_se": r.get(T.metric_se(FID)), "k": int(r.get(T.M_SAMPLE_SEEDS) or 1)}
            for r in _finished(runs) if r.get(FID) is not None]
    data = pd.DataFrame(rows, columns=["model", "variant", "method", "n_params", "sampling_gflops", "fid", "run_se", "k"])
    data = data.astype({"n_params": float, "sampling_gflops": float, "fid": float, "run_se": float})
    keys = ["model", "variant", "method"]
    out = []
    for key, part in data.groupby(keys, sort=True):
        est = estimate(part["fid"].tolist(), part["run_se"].tolist(), int(part["k"].min()))
        out.append({**dict(zip(keys, key)), "n_params": part["n_params"].mean(),
                    "sampling_gflops": part["sampling_gflops"].mean(), "fid": est.mean, "fid_se": est.se,
                    "n": est.n_runs, "k": est.n_sample_seeds})
    return pd.DataFrame(out, columns=[*keys, "n_params", "sampling_gflops", "fid", "fid_se", "n", "k"])


def fig6(runs: pd.DataFrame, out_dir: str | Path) -> pd.DataFrame:
    """Figure 6: FID against model parameters and against sampling compute, vanilla vs MG (bars: SE over training
    seeds; n and k in the CSV)."""
    data = fig6_data(runs)
    plt, sns = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, x, name in zip(axes, ("n_params", "sampling_gflops"), ("parameters", "sampling GFLOPs per image")):
        part = data.dropna(subset=[x])
        if not part.empty:
            sns.lineplot(part.sort_values(x), x=x, y="fid", hue="method", marker="o", ax=ax, errorbar=None)
            bars = part.dropna(subset=["fid_se"])
            ax.errorbar(bars[x], bars["fid"], yerr=bars["fid_se"], fmt="none", ecolor="0.4", capsize=2, lw=0.8)
            for r in part.to_dict("records"):
                ax.annotate(r["model"], (r[x], r["fid"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
            ax.set_xscale("log")
        n = sorted(set(part["n"])) if not part.empty else []
        seeds = f" (mean ± SE, n = {'/'.join(str(int(v)) for v in n)})" if n else ""
        ax.set(xlabel=name, ylabel=f"FID{seeds}", title=f"FID against {name}")
    fig.tight_layout()
    save_figure(fig, out_dir, "fig6_scaling")
    return data


# ----------------------------------------------------------------------------- Figure 2


def load_samples(tracking_uri: str | None, run_id: str, artifact: str = T.A_SAMPLES_NPZ) -> dict[str, np.ndarray]:
    """The arrays of a run's `samples/samples.npz` artifact (x, y, optional traj)."""
    with tempfile.TemporaryDirectory(prefix="mgbench-samples-") as tmp, \
            np.load(T.RunStore(tracking_uri).download(run_id, artifact, tmp)) as npz:
        return {k: npz[k] for k in npz.files}


def fig2_data(runs: pd.DataFrame, samples: dict[str, dict[str, np.ndarray]], max_traj: int = 64) -> pd.DataFrame:
    """Tidy points of the 2D toy: final samples (kind=sample) and trajectories (kind=traj) per method."""
    frames = []
    for r in _finished(runs):
        arrays = samples.get(r[L.RUN_ID])
        if arrays is None:
            continue
        x, y = np.asarray(arrays["x"], dtype=float), np.asarray(arrays["y"])
        base = {"method": method_label(r), "run_id": r[L.RUN_ID]}
        frames.append(pd.DataFrame({**base, "kind": "sample", "i": np.arange(len(x)), "step": -1,
                                    "x": x[:, 0], "y": x[:, 1], "label": y.astype(int)}))
        if "traj" in arrays:
            traj = np.asarray(arrays["traj"], dtype=float)[:, :max_traj]
            s, n = traj.shape[:2]
            frames.append(pd.DataFrame({**base, "kind": "traj", "i": np.tile(np.arange(n), s),
                                        "step": np.repeat(np.arange(s), n), "x": traj[..., 0].ravel(),
                                        "y": traj[..., 1].ravel(), "label": np.tile(y[:n].astype(int), s)}))
    cols = ["method", "run_id", "kind", "i", "step", "x", "y", "label"]
    return pd.concat(frames, ignore_index=True)[cols] if frames else pd.DataFrame(columns=cols)


def one_run_per_method(runs: pd.DataFrame) -> pd.DataFrame:
    if L.P_DATA not in runs:
        return runs.iloc[:0]
    done = runs[(runs[L.STATUS] == "finished") & (runs[L.P_DATA] == "grid2d")]
    if done.empty:
        return done
    labels = [method_label(r) for r in _finished(done)]
    return done.assign(_method=labels).sort_values([L.P_SEED, T.TAG_TRIAL]).drop_duplicates("_method")


def _cfg_panels(chosen: pd.DataFrame, tracking_uri: str | None) -> pd.DataFrame:
    """Vanilla runs' seeds sampled under CFG (`samples/samples_cfg_<s>.npz`, one per eval.cfg_sweep scale)."""
    store = T.RunStore(tracking_uri)
    frames = []
    for r in _finished(chosen[chosen[L.VARIANT] == "vanilla"]):
        names = [p for p in store.artifact_files(r[L.RUN_ID], T.A_SAMPLES) if "samples_cfg_" in p]
        for art in names:
            scale = float(art.rsplit("samples_cfg_", 1)[1].removesuffix(".npz"))
            label = f"CFG s={scale:.2f}"
            part = fig2_data(pd.DataFrame([r]), {r[L.RUN_ID]: load_samples(tracking_uri, r[L.RUN_ID], art)})
            frames.append(part.assign(method=label))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def guidance_order(method: str) -> tuple:
    """Panel order of Fig. 2: vanilla, CFG by scale, MG by w (automatic w last), MG + CFG by w then scale."""
    def number(text: str) -> float:
        try:
            return float(text.split("=", 1)[1].split(" ", 1)[0])
        except (IndexError, ValueError):
            return math.inf           # MG AUTO, w ranges: after the numbers
    parts = method.split(" + ")
    if method == "vanilla":
        return (0, 0.0, 0.0, method)
    if method.startswith("CFG"):
        return (1, number(method), 0.0, method)
    return (2 if len(parts) == 1 else 3, number(parts[0]), number(parts[1]) if len(parts) > 1 else 0.0, method)


def fig2_caption(data: pd.DataFrame, implied: dict[str, float]) -> str:
    """What Fig. 2 shows, for the text under it."""
    mg = [f"{m} trains towards CFG s={s:.2f}" for m, s in sorted(implied.items(), key=lambda i: guidance_order(i[0]))]
    n = data[data["kind"] == "sample"].groupby("method").size()
    return ("Fig. 2: the 2D toy (two-class checkerboard; shaded squares: where each class's data lies). Columns: the "
            "conditional model (vanilla, 1 network forward per step), CFG on it at each swept scale s (pred = cond + "
            "s (cond - uncond), 2 forwards), MG models at each w (1 forward), in order of guidance strength; one run "
            f"per method (lowest training seed), {int(n.min()) if len(n) else 0} samples each. Rows: final samples "
            "coloured by their class label; sampling trajectories (noise to data) of the first samples; sample "
            "density (2D histogram, darker = more samples). " + ("; ".join(mg) + " (f g / (1 - f g))." if mg else ""))


def draw_fig2(data: pd.DataFrame, cells: int = 4, half_width: float = 2.0, caption: str = "") -> Any:
    """The Fig. 2 figure: one column per method in guidance order, the board drawn under the samples."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    methods = sorted(dict.fromkeys(data["method"]), key=guidance_order)
    plt, sns = _plt()
    colours = dict(enumerate(sns.color_palette("deep", 2)))
    ncol = max(len(methods), 1)
    fig, axes = plt.subplots(3, ncol, figsize=(3 * ncol, 9.4), squeeze=False)
    size, lim = 2 * half_width / cells, half_width + 0.5
    for j, method in enumerate(methods):
        pts = data[(data["method"] == method) & (data["kind"] == "sample")]
        traj = data[(data["method"] == method) & (data["kind"] == "traj")]
        for i in range(cells):    # the board: class (i + j) % 2 squares, shaded in their class's colour
            for k in range(cells):
                axes[0, j].add_patch(Rectangle((-half_width + i * size, -half_width + k * size), size, size, lw=0,
                                               color=colours[(i + k) % 2], alpha=0.12))
        sns.scatterplot(pts, x="x", y="y", hue="label", s=3, linewidth=0, palette=colours, ax=axes[0, j], legend=False)
        if not traj.empty:
            sns.lineplot(traj, x="x", y="y", units="i", hue="label", estimator=None, sort=False, lw=0.4, alpha=0.6,
                         palette=colours, ax=axes[1, j], legend=False)
        sns.histplot(pts, x="x", y="y", bins=60, binrange=(-lim, lim), ax=axes[2, j], cmap="mako")
        axes[0, j].set_title(method)
        for i, what in enumerate(("samples", "trajectories", "density")):
            axes[i, j].set(xlabel="", ylabel=what if j == 0 else "", aspect="equal", xlim=(-lim, lim), ylim=(-lim, lim))
    handles = [Line2D([], [], ls="", marker="o", color=colours[c], label=f"class {c}") for c in (0, 1)]
    fig.legend(handles=handles, loc="upper center", ncol=2, frameon=False, bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    fig.text(0.01, 0.01, caption, ha="left", va="bottom", fontsize=8, wrap=True)
    return fig


def fig2(runs: pd.DataFrame, tracking_uri: str | None, out_dir: str | Path) -> pd.DataFrame:
    """Figure 2: the 2D toy; samples, trajectories and density per method (one run each, the lowest seed)."""
    chosen = one_run_per_method(runs)
    samples = {rid: load_samples(tracking_uri, rid) for rid in chosen[L.RUN_ID]}
    data = pd.concat([fig2_data(chosen, samples), _cfg_panels(chosen, tracking_uri)], ignore_index=True)
    implied = {method_label(r): float(r["objective.implied_cfg_scale"]) for r in _finished(chosen)
               if r[L.VARIANT] == "mg" and not uses_cfg(r) and r.get("objective.implied_cfg_scale") is not None}
    cells = chosen["data.grid_cells"].dropna().unique() if "data.grid_cells" in chosen else []
    fig = draw_fig2(data, int(cells[0]) if len(cells) == 1 else 4, caption=fig2_caption(data, implied))
    save_figure(fig, out_dir, "fig2_toy")
    order = {m: i for i, m in enumerate(sorted(dict.fromkeys(data["method"]), key=guidance_order))}
    return data.assign(panel=data["method"].map(order).astype("Int64"))
