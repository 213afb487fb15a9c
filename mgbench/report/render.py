"""Tables -> Markdown, LaTeX and CSV files (deterministic: same rows, same bytes)."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from mgbench.report.specs import METRICS
from mgbench.report.tables import Table

HEADER = {m: h for m, h, _, _ in METRICS}
DECIMALS = {m: d for m, _, d, _ in METRICS}
ARROW = {m: "↑" if higher else "↓" for m, _, _, higher in METRICS}   # which direction is better
DASH = "–"                      # a setting that was expected but not measured (or a value the paper omits)
PM = "±"
ONE_RUN = "†"                   # one training seed: the ± holds the sampling noise only


def decimals(se: float, least: int) -> int:
    """Decimals that show two significant digits of the SE (at least `least`, at most 8)."""
    if not math.isfinite(se) or se <= 0:
        return least
    return min(8, max(least, 1 - math.floor(math.log10(se))))


def cell(row: dict, metric: str) -> str:
    """One metric cell as text: `mean ± SE` (2 significant digits of the SE), a percentage, a state, or a dash."""
    value, se = row.get(metric), row.get(f"{metric}_se")
    if row["variant"] == "improve":
        return DASH if _missing(value) else f"{value:+.1f}%"
    if _missing(value):
        if row["source"] == "measured" and row["n_finished"] == 0 and row["status"] != "finished":
            return DASH if row["status"] == "missing" else row["status"].split(" ", 1)[-1].split(",")[0]
        return DASH
    if _missing(se):
        return f"{value:.{DECIMALS[metric]}f}"
    d = decimals(se, DECIMALS[metric])
    return f"{value:.{d}f} {PM} {se:.{d}f}" + (ONE_RUN if row.get(f"{metric}_n") == 1 else "")


def _missing(value) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def runs_cell(row: dict) -> str:
    """What a measured row rests on, training seeds x sample seeds: `3x5`, `2x5 of 3 (1 failed)`, `0/1 (1 failed)`."""
    if row["source"] == "paper" or row["variant"] == "improve":
        return ""
    if row["status"] == "missing":
        return "0 (missing)"
    if row["n_finished"] == 0:
        return f"0/{row['n_runs']} ({row['status']})"
    text = f"{row['n_finished']}x{row['sample_seeds']}"
    return text if row["status"] == "finished" else f"{text} of {row['n_runs']} ({row['status']})"


def _label_cells(row: dict) -> list[str]:
    names = {"improve": "IMPROVE", "mg": "+MG", "vanilla": "vanilla", "cfg": "CFG", "baseline": ""}
    variant = names.get(row["variant"], row["variant"])
    setting = row["setting"] + (f" [{row['extra']}]" if row["extra"] else "")
    return [row["model"], variant, setting, row["scale"], runs_cell(row)]


def text_rows(table: Table) -> tuple[list[str], list[list[tuple[str, bool]]]]:
    """Header and body cells (text, is-best) shared by the Markdown and LaTeX writers."""
    metrics = list(table.spec.metrics)
    header = ["Model", "Variant", "Setting", "Source", "Runs"] + [f"{HEADER[m]} {ARROW[m]}" for m in metrics]
    body = []
    for row in table.rows.to_dict("records"):
        cells = [(c, False) for c in _label_cells(row)]
        cells += [(cell(row, m), bool(row[f"{m}_best"])) for m in metrics]
        body.append(cells)
    return header, body


def _title(table: Table) -> str:
    study = f" (study {table.study})" if table.study else ""
    return f"Table {table.spec.number}: {table.spec.title}{study}"


def _legend(table: Table) -> list[str]:
    """The notes under a table: the spec's notes, what each column and the ± mean, and what bold marks."""
    arrows = ", ".join(f"{HEADER[m]} {ARROW[m]}" for m in table.spec.metrics)
    return [*table.spec.notes,
            "Columns: Model (a DiT-* network trained as a flow is the paper's SiT-*); Variant (vanilla: w = 1; +MG: "
            "model guidance; CFG: a vanilla model sampled with classifier-free guidance; IMPROVE: relative change of "
            "MG vs vanilla); Setting (the ablated knob, [params that also differ between the row's runs]); Source "
            "(paper: published; measured: this study, at its scale); Runs (measured: training seeds x sample seeds "
            "per run, e.g. 3x5; runs that did not finish are counted apart); metrics: " + arrows +
            " (↓ lower is better, ↑ higher is better).",
            f"Measured values: the mean over training seeds of each run's mean over its sample seeds; {PM} is one "
            "standard error of that mean (SD of the run means / sqrt(n), holding training-seed and sampling noise). "
            f"{ONE_RUN} one training seed: {PM} is the SE over its sample seeds only (sampling noise, without the "
            f"training-seed noise). No {PM}: one run at one sample seed (no estimate). Each run's values: "
            f"table{table.spec.number}_runs.csv.",
            "Best value per column in bold, within each model block and source, among the nominal rows only "
            "(matched rows sample at another strength and are never bold); bold marks the best mean, not a "
            f"resolved difference. {DASH} = not measured or not published."]


def to_markdown(table: Table) -> str:
    """The table as GitHub Markdown with a title line and notes."""
    header, body = text_rows(table)
    lines = [f"### {_title(table)}", "", "| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] * 5 + ["---:"] * (len(header) - 5)) + "|"]
    for cells in body:
        texts = [f"**{t}**" if best else t for t, best in cells]
        lines.append("| " + " | ".join(t.replace("|", "\\|") for t in texts) + " |")
    lines += [""] + [f"- {n}" for n in _legend(table)]
    return "\n".join(lines) + "\n"


def _tex(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("#", r"\#"), ("_", r"\_"),
                 ("~", r"\textasciitilde{}"), ("^", r"\^{}"), (PM, r"$\pm$"), (DASH, "--"), (ONE_RUN, r"$^\dagger$"),
                 ("↓", r"$\downarrow$"), ("↑", r"$\uparrow$")):
        text = text.replace(a, b)
    return text


def to_latex(table: Table) -> str:
    """The table as a LaTeX tabular (booktabs), best values in bold, a rule between families."""
    header, body = text_rows(table)
    families = table.rows["family"].tolist()
    lines = [f"% {_title(table)}", r"\begin{tabular}{lllll" + "r" * (len(header) - 5) + "}", r"\toprule",
             " & ".join(_tex(h) for h in header) + r" \\", r"\midrule"]
    for i, cells in enumerate(body):
        if i and families[i] != families[i - 1]:
            lines.append(r"\midrule")
        texts = [rf"\textbf{{{_tex(t)}}}" if best else _tex(t) for t, best in cells]
        lines.append(" & ".join(texts) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"] + [f"% {_tex(n)}" for n in _legend(table)]
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    """The table's tidy rows as CSV: means, SEs, runs per metric, best flags, run counts, seeds and states."""
    return table.rows.assign(table=table.spec.number).to_csv(index=False, float_format="%.6g", lineterminator="\n")


def runs_csv(table: Table) -> str:
    """The per-run frame as CSV: per run its row, training seed, run id, and per metric mean, SE, K, seed values."""
    return table.runs.assign(table=table.spec.number).to_csv(index=False, float_format="%.6g", lineterminator="\n")


def write_table(table: Table, out_dir: str | Path) -> list[Path]:
    """Write `table<N>.md`, `.tex`, `.csv` and `table<N>_runs.csv` under out_dir; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"table{table.spec.number}"
    paths = []
    for name, text in ((f"{stem}.md", to_markdown(table)), (f"{stem}.tex", to_latex(table)),
                       (f"{stem}.csv", to_csv(table)), (f"{stem}_runs.csv", runs_csv(table))):
        path = out / name
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths
