"""benchmarks.md: the machine, a summary of every check against its goal, then one table per section."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mgbench.bench.timing import Check, Section

SECTION_ORDER = ("sampling", "training", "models", "harness", "report")
NOT_MEASURED = "not measured yet"


def table(rows: list[dict[str, Any]]) -> str:
    """A GitHub markdown table from rows of dicts (columns in first-seen order)."""
    if not rows:
        return ""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def _checks(checks: list[Check]) -> str:
    rows = [{"claim": c.name, "measured": "not measured" if c.value is None else f"{c.value:.3f}", "goal": c.goal,
             "met": verdict(c)} for c in checks]
    return table(rows)


def verdict(c: Check) -> str:
    """The `met` cell: yes | no | - , or `unreliable (why)` when the timings cannot give a verdict."""
    return f"unreliable ({c.unreliable})" if c.unreliable else {True: "yes", False: "no", None: "-"}[c.ok]


def _machine(info: dict[str, Any]) -> str:
    return "\n".join(f"- {k}: {v}" for k, v in info.items())


def _section(sec: Section) -> str:
    parts = [f"### {sec.title}", "", table(sec.rows)]
    if sec.notes:
        parts += [""] + [f"- {n}" for n in sec.notes]
    return "\n".join(parts)


def render_sections(sections: list[Section], heading: str = "##") -> str:
    """Checks summary and per-section tables (sections in the standard order)."""
    order = {n: i for i, n in enumerate(SECTION_ORDER)}
    sections = sorted(sections, key=lambda s: order.get(s.name, len(order)))
    checks = [c for s in sections for c in s.checks]
    out = [f"{heading} Claims against goals", "", _checks(checks) if checks else NOT_MEASURED, ""]
    for s in sections:
        out += [_section(s), ""]
    return "\n".join(out)


def render(machine: dict[str, Any], sections: list[Section], *, command: str, skipped: list[str],
           gpu: dict[str, Any] | None = None) -> str:
    """The whole benchmarks.md."""
    out = ["# mgbench benchmarks: the speed claims as ratios", "",
           "Seconds are not comparable across machines; the ratios are (MG vs CFG sampling, MG vs vanilla "
           "training, harness overhead). Written by `" + command + "`.", "",
           "## CPU", "", "Machine:", "", _machine(machine), "", render_sections(sections, "###").rstrip()]
    if skipped:
        out += ["", "Not run in this invocation: " + ", ".join(skipped) + f" ({NOT_MEASURED} here)."]
    out += ["", "## GPU", ""]
    if gpu is None:
        out += [f"{NOT_MEASURED}: run `python -m mgbench.bench.gpu --out DIR` on one GPU, then "
                "`mgbench bench --gpu-results DIR/gpu_results.json` to merge its figures here."]
    else:
        out += ["Machine:", "", _machine(gpu.get("machine", {})), "", f"Settings: {gpu.get('settings', {})}", "",
                render_sections([Section.from_dict(s) for s in gpu.get("sections", [])], "###").rstrip()]
    return "\n".join(out) + "\n"


def load_results(path: str | Path) -> dict[str, Any]:
    """A results JSON ({machine, settings, sections}) as written by the GPU script; one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GPU results file (written by python -m mgbench.bench.gpu)")
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or "sections" not in data:
        raise ValueError(f"{path}: not a GPU results file (expected keys machine, settings, sections)")
    return data


def results_dict(machine: dict[str, Any], settings: dict[str, Any], sections: list[Section]) -> dict[str, Any]:
    """The JSON form of a benchmark run."""
    return {"machine": machine, "settings": settings, "sections": [s.to_dict() for s in sections]}
