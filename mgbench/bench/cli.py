"""`mgbench bench`: measure the speed claims as ratios on this machine and write runs/bench/benchmarks.md
(`--out reports/benchmarks.md` updates the committed one)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from mgbench.bench.timing import Section

DEFAULT_OUT = "runs/bench/benchmarks.md"   # the committed reports/benchmarks.md changes only when named by --out
SECTION_ORDER = ("sampling", "training", "models", "harness", "report")  # = bench.markdown.SECTION_ORDER, torch-free


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `mgbench bench` on the top-level subparsers."""
    b = subparsers.add_parser("bench", help="measure MG vs CFG sampling, MG training cost and harness overhead")
    b.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (seconds; for tests)")
    b.add_argument("--only", default="", metavar="LIST",
                   help=f"comma-separated sections to run (default all: {','.join(SECTION_ORDER)})")
    b.add_argument("--out", default=DEFAULT_OUT, help=f"markdown report to write (default {DEFAULT_OUT})")
    b.add_argument("--json", default=None, metavar="FILE", help="also write the figures as JSON")
    b.add_argument("--gpu-results", default=None, metavar="FILE",
                   help="gpu_results.json from `python -m mgbench.bench.gpu` to merge into the GPU section")
    b.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    b.add_argument("--repeats", type=int, default=0, help="interleaved repeats per comparison (0 = per section)")
    b.add_argument("--report-runs", type=int, default=0, help="runs in the report benchmark's store (0: 10,000; "
                   "--quick: 300)")
    b.add_argument("--no-study", action="store_true", help="skip the (slow) local study overhead measurement")
    b.add_argument("--no-compile", action="store_true", help="skip the (slow on a CPU) compiled training-step rows")
    b.set_defaults(func=cmd_bench)
    return b


def parse_only(text: str) -> list[str]:
    """`sampling,training` -> the section names, in the standard order; unknown names are errors."""
    if not text.strip():
        return list(SECTION_ORDER)
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [n for n in names if n not in SECTION_ORDER]
    if bad:
        raise ValueError(f"--only: unknown section {bad[0]!r} (choose from {', '.join(SECTION_ORDER)})")
    return [n for n in SECTION_ORDER if n in names]


def runners(args: argparse.Namespace) -> dict[str, Callable[[], Section]]:
    """One no-argument function per section, configured from the command line."""
    from mgbench.bench.harness import bench_harness, bench_report_section
    from mgbench.bench.models import bench_models
    from mgbench.bench.sampling import bench_sampling
    from mgbench.bench.training import bench_training

    rep = args.repeats or None
    n_runs = args.report_runs or (300 if args.quick else 10_000)
    compile_rows = () if args.quick or args.no_compile else ("vanilla", "MG")
    return {
        "sampling": lambda: bench_sampling(quick=args.quick, repeats=rep),
        "training": lambda: bench_training(quick=args.quick, repeats=rep, compile_rows=compile_rows),
        "models": lambda: bench_models(quick=args.quick, repeats=rep),
        "harness": lambda: bench_harness(quick=args.quick, study=not (args.quick or args.no_study)),
        "report": lambda: bench_report_section(n_runs),
    }


def run_bench(args: argparse.Namespace, echo: Callable[[str], None] = print) -> tuple[list[Section], str]:
    """Run the chosen sections, print each check, write the markdown; returns the sections and the text."""
    import torch

    from mgbench.bench.markdown import load_results, render, results_dict
    from mgbench.bench.timing import Section, machine

    if args.threads:
        torch.set_num_threads(args.threads)
    only = parse_only(args.only)
    gpu = load_results(args.gpu_results) if args.gpu_results else None
    info = machine()
    sections: list[Section] = []
    funcs = runners(args)
    for name in only:
        t0 = time.perf_counter()
        try:
            sec = funcs[name]()
        except Exception as e:  # noqa: BLE001 - one failing section must not lose the others' figures
            sec = Section(name, f"{name}: failed", notes=[f"{type(e).__name__}: {e}"])
        sections.append(sec)
        echo(f"[{name}] {time.perf_counter() - t0:.1f} s")
        for c in sec.checks:
            echo("  " + c.line())
    command = "mgbench bench" + "".join(f" {a}" for a in _argv_shown(args))
    text = render(info, sections, command=command, skipped=[n for n in SECTION_ORDER if n not in only], gpu=gpu)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results_dict(info, {"quick": args.quick}, sections), indent=1))
    echo(f"wrote {out}")
    return sections, text


def _argv_shown(args: argparse.Namespace) -> list[str]:
    """The options that shaped this run, for the report's first line."""
    shown = ["--quick"] if args.quick else []
    if args.only:
        shown.append(f"--only {args.only}")
    if args.threads:
        shown.append(f"--threads {args.threads}")
    if args.repeats:
        shown.append(f"--repeats {args.repeats}")
    if args.no_compile:
        shown.append("--no-compile")
    if args.gpu_results:
        shown.append(f"--gpu-results {args.gpu_results}")
    return shown


def cmd_bench(args: argparse.Namespace) -> int:
    """Entry point of `mgbench bench`: one-line errors for bad options or result files."""
    try:
        run_bench(args)
    except (ValueError, FileNotFoundError) as e:
        from mgbench.config import print_error

        return print_error("mgbench bench", e)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run `mgbench bench` without the top-level command (python -m mgbench.bench.cli)."""
    p = argparse.ArgumentParser(prog="mgbench")
    add_bench_parser(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
