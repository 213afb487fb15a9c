"""Tables -> Markdown, LaTeX and CSV files (deterministic: same rows, same bytes)."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from mgbench.report.specs import METRICS
from mgbench.report.tables import Table

HEADER = {m: h for m, h, _, _ in METRICS}
DECIMALS = {m: d for m, _, d, _ in METRICS}
DASH = "–"                      # a setting that was expected but not measured (or a value the paper omits)
PM = "±"


def cell(row: dict, metric: str) -> str:
    """One metric cell as text: mean, `mean ± std` over several seeds, a percentage, a state, or a dash."""
    value, std = row.get(metric), row.get(f"{metric}_std")
    if row["variant"] == "improve":
        return DASH if _missing(value) else f"{value:+.1f}%"
    if _missing(value):
        if row["source"] == "measured" and row["n_finished"] == 0 and row["status"] != "finished":
            return DASH if row["status"] == "missing" else row["status"].split(" ", 1)[-1].split(",")[0]
        return DASH
    d = DECIMALS[metric]
    text = f"{value:.{d}f}"
    if row.get("n_finished", 0) > 1 and not _missing(std):
        text += f" {PM} {std:.{d}f}"
    return text


def _missing(value) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def runs_cell(row: dict) -> str:
    """How many runs a measured row rests on: `3`, `2/3 (1 failed)`, `0 (missing)`; empty for paper rows."""
    if row["source"] == "paper" or row["variant"] == "improve":
        return ""
    if row["status"] == "missing":
        return "0 (missing)"
    if row["status"] == "finished":
        return str(row["n_runs"])
    return f"{row['n_finished']}/{row['n_runs']} ({row['status']})"


def _label_cells(row: dict) -> list[str]:
    variant = {"improve": "IMPROVE", "mg": "+MG", "vanilla": "vanilla", "baseline": ""}.get(row["variant"], row["variant"])
    setting = row["setting"] + (f" [{row['extra']}]" if row["extra"] else "")
    return [row["model"], variant, setting, row["scale"], runs_cell(row)]


def text_rows(table: Table) -> tuple[list[str], list[list[tuple[str, bool]]]]:
    """Header and body cells (text, is-best) shared by the Markdown and LaTeX writers."""
    metrics = list(table.spec.metrics)
    header = ["Model", "Variant", "Setting", "Source", "Runs"] + [HEADER[m] for m in metrics]
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
    return [*table.spec.notes, "Best value per column in bold (lowest FID/sFID, highest IS/Prec./Rec.), within each "
            f"model block and source. Measured: mean {PM} std over seeds; {DASH} = not measured or not published."]


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
                 ("~", r"\textasciitilde{}"), ("^", r"\^{}"), (PM, r"$\pm$"), (DASH, "--")):
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
    """The table's tidy rows as CSV: numbers, std, best flags, run counts and states."""
    return table.rows.assign(table=table.spec.number).to_csv(index=False, float_format="%.6g", lineterminator="\n")


def write_table(table: Table, out_dir: str | Path) -> list[Path]:
    """Write `table<N>.md`, `.tex` and `.csv` under out_dir; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext, text in (("md", to_markdown(table)), ("tex", to_latex(table)), ("csv", to_csv(table))):
        path = out / f"table{table.spec.number}.{ext}"
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths
