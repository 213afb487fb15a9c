"""`report claims --only`: re-evaluate some claims, keep every other row of the earlier table as it was."""
from __future__ import annotations

import argparse

import pandas as pd
import yaml
from test_report_claims import _claim, _w, specs  # noqa: F401  (specs: the module's store fixture)

from mgbench.report.cli import add_report_parser
from mgbench.report.stats import FAILS, HOLDS, UNRESOLVED


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_report_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["report", "claims", *argv])


def _write(path, *claims):
    path.write_text(yaml.safe_dump({"claims": [{**c, "id": f"c{i}"} for i, c in enumerate(claims)]}))


def test_only_updates_the_chosen_rows_and_keeps_the_rest(specs, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path, out = tmp_path / "claims.yaml", tmp_path / "out"
    _write(path, _claim(specs, _w(1.5), _w(1.0)), _claim(specs, _w(1.5), _w(1.25)))
    full_run = _args("--claims", str(path), "--out", str(out))
    assert full_run.func(full_run) == 0
    full = (out / "claims.md").read_text()
    assert pd.read_csv(out / "claims.csv")["verdict"].tolist() == [HOLDS, UNRESOLVED]
    # Both declarations change; only c1 is re-evaluated, so c0 keeps its earlier row (and verdict).
    _write(path, _claim(specs, _w(1.0), _w(1.5)), _claim(specs, _w(1.0), _w(1.5)))
    args = _args("--claims", str(path), "--out", str(out), "--only", "c1")
    assert args.func(args) == 0
    md = (out / "claims.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| `c")]
    assert rows[0] == next(line for line in full.splitlines() if line.startswith("| `c0`"))
    assert rows[1].startswith("| `c1`") and f"| **{FAILS}** |" in rows[1]
    assert "Rows of c1 were re-evaluated with `--only c1`" in md
    assert md.rstrip().endswith("1 of 2 claims hold at the measured n.")
    assert pd.read_csv(out / "claims.csv")["verdict"].tolist() == [HOLDS, FAILS]
    # A full run regenerates every row and drops the note.
    args = _args("--claims", str(path), "--out", str(out))
    assert args.func(args) == 0
    md = (out / "claims.md").read_text()
    assert "re-evaluated with `--only" not in md
    assert pd.read_csv(out / "claims.csv")["verdict"].tolist() == [FAILS, FAILS]
    capsys.readouterr()


def test_only_refuses_what_it_cannot_merge(specs, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path, out = tmp_path / "claims.yaml", tmp_path / "out"
    _write(path, _claim(specs, _w(1.5), _w(1.0)), _claim(specs, _w(1.5), _w(1.25)))
    args = _args("--claims", str(path), "--out", str(out), "--only", "c1")
    assert args.func(args) == 2 and not out.exists()                      # no earlier table to keep rows from
    assert "run without --only first" in capsys.readouterr().err
    full_run = _args("--claims", str(path), "--out", str(out))
    assert full_run.func(full_run) == 0
    before = (out / "claims.md").read_text()
    args = _args("--claims", str(path), "--out", str(out), "--only", "nope*")
    assert args.func(args) == 2 and (out / "claims.md").read_text() == before
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "matches no claim id (ids: c0, c1)" in err[0]
    _write(path, _claim(specs, _w(1.5), _w(1.0)), _claim(specs, _w(1.5), _w(1.25)), _claim(specs, _w(1.0), _w(1.25)))
    args = _args("--claims", str(path), "--out", str(out), "--only", "c1")  # c2 is new: no earlier row to keep
    assert args.func(args) == 2 and (out / "claims.md").read_text() == before
    assert "claim c2 is not in the earlier" in capsys.readouterr().err
