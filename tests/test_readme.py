"""README.md's commands against the code, so the README cannot drift from it.

Fast (always): every command in README.md's code blocks, and every `mgbench ...` in its prose, parses with
mgbench's own parser (an unknown command, option or choice fails); every script it runs exists and passes
`bash -n`; the pytest line of the test command (`.ci/run`) has options pytest accepts; files under studies/
and slurm/ that commands name exist; and every command is either run by the slow test or says why not.

Slow: a clean copy of the repository (tracked files and untracked ones git does not ignore: a clone plus
uncommitted work) runs the README's main job with shortened settings, then the README's other commands in
that order. The main job renders the table where the README says, with the committed table's rows; nothing
outside runs/ changes (the committed reports/ included), and no command writes outside runs/.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT

from mgbench.cli import COMMANDS, _command_in, _unknown_options, build_parser

README = ROOT / "README.md"
SHELL_BLOCKS = {"bash", "sh", "shell", "console"}   # fenced blocks whose lines are commands
OPERATORS = {"&&", "||", ";", "|"}                   # between simple commands on one line
PLACEHOLDER = re.compile(r"\b[A-Z]+\.yaml$")         # studies/X.yaml: the reader's own study
CHECKED_PATHS = ("studies/", "slurm/")               # inputs a command names: they must exist
MISSING_ARGUMENTS = re.compile(r"the following arguments are required|one of the arguments .* is required")

# Shortened settings: the main job's trials and `mgbench train` run 40 steps and evaluate 200 samples.
QUICK = ["train.steps=40", "train.log_every=20", "train.ckpt_every=40", "optim.batch_size=64",
         "eval.n_samples=200", "sample.steps=8", "sample.n_grid=200"]
QUICK_SET = [a for kv in QUICK for a in ("--set", kv)]
STUDY = "studies/quickstart.yaml"                    # stands in for studies/X.yaml
# The README's commands after the main job, as written (after `mgbench`): the arguments the slow test adds.
RUN_AFTER_MAIN_JOB = {
    "train studies/base/grid2d.yaml --set objective.w=1.5": QUICK_SET,
    "train studies/base/grid2d.yaml --dry-run": [],
    "study validate studies/quickstart.yaml": [],
    "study run studies/quickstart.yaml --dry-run": [],
    "study run studies/quickstart.yaml": [],          # the rerun: it resumes with the recorded --set
    "study status studies/quickstart.yaml": [],
    "report all --study studies/X.yaml": [],
    "report toy --study quickstart --tracking-uri sqlite:///runs/quickstart/mlflow.db": [],
    "frontier --study studies/X.yaml --history": [],
    "eval runs/quickstart/trials/0002": [],
    "bench": ["--quick", "--no-study"],
}
# The README's commands the slow test leaves out, and why.
NOT_RUN = {
    "ui --study studies/quickstart.yaml": "serves until Ctrl-C (tests/test_ui.py and tests/test_ui_browser.py)",
    "report table3 --study studies/digits/dit_table3_w.yaml --study studies/digits/dit_table3_auto.yaml "
    "--out reports/digits": "needs the digits studies' runs (hours) and writes the committed reports/digits",
    "bench --out reports/benchmarks.md": "writes the committed reports/benchmarks.md",
    "study cancel studies/quickstart.yaml": "stops a running study's jobs (tests/test_study_jobstates.py)",
    "report system --study studies/digits/sit_table3_w.yaml --runs-dir runs/digits/system/sit":
        "needs the digits studies' runs (hours) and re-evaluates their checkpoints (tests/test_report_system.py)",
}


@dataclass(frozen=True)
class Command:
    line: int           # README line where it starts
    argv: list[str]     # one simple command's words
    comment: str = ""   # the README's trailing comment on it

    @property
    def key(self) -> str:
        """The command after its program (`mgbench`): how the tables above name it."""
        return " ".join(mgbench_args(self.argv) or self.argv)

    def __str__(self) -> str:
        return f"README.md:{self.line}: `{shlex.join(self.argv)}`"


def code_blocks(lines: list[str]) -> list[tuple[int, str, list[str]]]:
    """(first line number, info string, lines) of each fenced and indented code block of a Markdown text."""
    blocks, i = [], 0
    while i < len(lines):
        fence = re.match(r"^ {0,3}(`{3,}|~{3,})\s*([\w-]*)", lines[i])
        if fence:
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith(fence[1])), len(lines))
            blocks.append((i + 2, fence[2].lower(), lines[i + 1:end]))
            i = end + 1
        elif lines[i].startswith("    ") and lines[i].strip() and (i == 0 or not lines[i - 1].strip()):
            end = i
            while end < len(lines) and (lines[end].startswith("    ") or not lines[end].strip()):
                end += 1
            blocks.append((i + 1, "", [line[4:] for line in lines[i:end]]))
            i = end
        else:
            i += 1
    return blocks


def is_command(words: list[str]) -> bool:
    """Whether a line of an unlabelled code block is a command: its first word is a program the README runs."""
    return bool(words) and (words[0] in ("bash", "mgbench", "pytest") or words[0].endswith("/mgbench")
                            or words[0].startswith("python"))


def shell_words(text: str) -> list[list[str]]:
    """The simple commands of one shell line (split at &&, ||, ;, |), comments left out."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    commands: list[list[str]] = [[]]
    for word in lexer:
        commands.append([]) if word in OPERATORS else commands[-1].append(word)
    return [c for c in commands if c]


def readme_commands(text: str | None = None) -> list[Command]:
    """Every command of README.md's code blocks, in order (continued lines joined)."""
    lines = (README.read_text() if text is None else text).splitlines()
    out: list[Command] = []
    for start, info, block in code_blocks(lines):
        if info and info not in SHELL_BLOCKS:
            continue
        joined: list[tuple[int, str]] = []
        for n, line in enumerate(block, start):
            if joined and joined[-1][1].endswith("\\"):
                joined[-1] = (joined[-1][0], joined[-1][1][:-1] + " " + line.strip())
            else:
                joined.append((n, line.strip()))
        for n, line in joined:
            if info == "console":
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            if info or is_command(line.split()):
                comment = line.split(" #", 1)[1].strip() if " #" in line else ""
                out.extend(Command(n, argv, comment) for argv in shell_words(line))
    return out


def prose_commands(text: str | None = None) -> list[Command]:
    """The `mgbench ...` code spans of README.md, in prose and in its layout (often partial: `mgbench ui`)."""
    out = []
    for n, line in enumerate((README.read_text() if text is None else text).splitlines(), 1):
        for span in re.findall(r"`([^`\n]+)`", line):
            words = span.split()
            if len(words) > 1 and (words[0] == "mgbench" or (words[0] in COMMANDS and not words[1].startswith("="))):
                out.append(Command(n, words if words[0] == "mgbench" else ["mgbench", *words]))
    return out


def mgbench_args(argv: list[str]) -> list[str] | None:
    """The arguments after `mgbench` (`.venv/bin/mgbench`, `python -m mgbench`), or None for other programs."""
    if argv[0] == "mgbench" or argv[0].endswith("/mgbench"):
        return argv[1:]
    if argv[0].startswith("python") or argv[0].endswith("/python"):
        return argv[3:] if argv[1:3] == ["-m", "mgbench"] else None
    return None


def parse_error(args: list[str], partial: bool = False) -> str | None:
    """What mgbench's own parser says about `mgbench ARGS` (as `mgbench.cli.main` parses), or None when it parses;
    partial: a missing required argument is fine (a span in prose)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parsed, extras = build_parser(_command_in(args)).parse_known_args(args)
            if extras:
                _unknown_options(parsed._parser, extras)
    except SystemExit as e:
        lines = err.getvalue().strip().splitlines()
        message = lines[-1] if lines else f"exit status {e.code}"
        return None if e.code == 0 or (partial and MISSING_ARGUMENTS.search(message)) else message
    return None


def pytest_lines(script: Path) -> list[list[str]]:
    """The arguments of each `python -m pytest` / `pytest` call in a shell script."""
    calls = []
    for line in script.read_text().splitlines():
        for argv in shell_words(line):
            for i, word in enumerate(argv):
                if word == "pytest" and (i == 0 or argv[i - 1] == "-m"):
                    calls.append(argv[i + 1:])
    return calls


# ----------------------------------------------------------------------------- fast: every command parses


def test_the_extractor_finds_fenced_indented_continued_and_chained_commands():
    text = ("Intro\n\n    bash x.sh && .venv/bin/mgbench study run a.yaml\n\n    a -> b -> c\n\n```bash\n"
            "mgbench report toy \\\n    --study q   # the toy table\n```\n\n```yaml\nspace: {w: 1}\n```\n"
            "See `mgbench study status a.yaml --watch`, `study run --no-reuse` and `train.steps`.\n")
    assert [(c.line, c.argv, c.comment) for c in readme_commands(text)] == [
        (3, ["bash", "x.sh"], ""), (3, [".venv/bin/mgbench", "study", "run", "a.yaml"], ""),
        (8, ["mgbench", "report", "toy", "--study", "q"], "the toy table")]
    assert [c.argv[1:] for c in prose_commands(text)] == [["study", "status", "a.yaml", "--watch"],
                                                          ["study", "run", "--no-reuse"]]
    assert parse_error(["study", "run", "a.yaml", "--no-resue"]) == (
        "mgbench study run: error: unrecognized arguments: --no-resue (did you mean '--no-reuse'?)")
    assert parse_error(["study", "run", "--no-reuse"], partial=True) is None
    assert "invalid choice: 'tabel3'" in parse_error(["report", "tabel3"])


def test_the_readme_documents_its_two_fresh_machine_commands_first():
    commands = readme_commands()
    assert [c.argv for c in commands[:3]] == [["bash", ".ci/install"],
                                              [".venv/bin/mgbench", "study", "run", STUDY], ["bash", ".ci/run"]]


@pytest.mark.parametrize("command", readme_commands(), ids=str)
def test_every_readme_command_exists_as_written(command):
    """mgbench commands parse; scripts exist and parse; input files exist; other programs are not expected."""
    args = mgbench_args(command.argv)
    if args is not None:
        assert command.argv[0] in ("mgbench", ".venv/bin/mgbench") or command.argv[1:3] == ["-m", "mgbench"]
        error = parse_error(args)
        assert error is None, f"{command}: {error}"
        for word in args:
            path = word.split("=", 1)[-1]
            if path.startswith(CHECKED_PATHS) and not PLACEHOLDER.search(path):
                assert (ROOT / path).exists(), f"{command}: {path} does not exist"
    elif command.argv[0] == "bash":
        script = ROOT / command.argv[1]
        assert script.is_file(), f"{command}: no {command.argv[1]}"
        check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, f"{command}: {check.stderr}"
    else:
        pytest.fail(f"{command}: a program this test cannot check; teach tests/test_readme.py")


@pytest.mark.parametrize("command", prose_commands(), ids=str)
def test_every_mgbench_command_in_the_prose_exists(command):
    error = parse_error(command.argv[1:], partial=True)
    assert error is None, f"{command}: {error}"


def test_the_test_commands_pytest_options_are_valid():
    """`bash .ci/run` is the suite: its pytest options parse and its paths exist (collected without importing)."""
    calls = pytest_lines(ROOT / ".ci" / "run")
    assert calls, ".ci/run runs no pytest"
    for args in calls:
        expression = any(a in ("-m", "-k") or a.startswith(("-m=", "-k=")) for a in args)
        no_import = [] if expression else ["-p", "no:python"]   # a marker expression is checked on the tests
        res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                              *no_import, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert res.returncode in (0, 5), f".ci/run: pytest {shlex.join(args)}: {res.stdout}{res.stderr}"


def after_main_job() -> list[str]:
    """The README's mgbench commands after its main job (the first), in the README's order, each once."""
    return list(dict.fromkeys(c.key for c in readme_commands()[2:] if mgbench_args(c.argv) is not None))


def test_every_readme_command_is_run_by_the_slow_test_or_says_why_not():
    others, known = set(after_main_job()), set(RUN_AFTER_MAIN_JOB) | set(NOT_RUN)
    assert not others - known, (f"README commands the slow test neither runs nor leaves out with a reason (add them "
                                f"to RUN_AFTER_MAIN_JOB or NOT_RUN): {sorted(others - known)}")
    assert not known - others, f"commands no longer in the README: {sorted(known - others)}"
    assert not set(RUN_AFTER_MAIN_JOB) & set(NOT_RUN)


# ----------------------------------------------------------------------------- slow: the commands run


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under root but runs/: relative path -> content hash ('' for a folder)."""
    out = {}
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        if rel != "runs" and not rel.startswith("runs/"):
            out[rel] = "" if path.is_dir() else hashlib.sha1(path.read_bytes()).hexdigest()
    return out


def changed_outside_runs(root: Path, before: dict[str, str]) -> list[str]:
    """The paths outside runs/ that were added, removed or changed since `before` (a snapshot of root)."""
    after = snapshot(root)
    return sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))


def table_rows(markdown: str) -> list[list[str]]:
    """The body rows of the first Markdown table in a text, as cells."""
    rows = [line for line in markdown.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


@pytest.fixture(scope="module")
def clean_copy(tmp_path_factory) -> Path:
    """The repository as a clean clone holds it, plus uncommitted work: the files git tracks or would add."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True)
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout: {listed.stderr.decode().strip()}")
    copy = tmp_path_factory.mktemp("clone") / "mgbench"
    for name in filter(None, listed.stdout.decode().split("\0")):
        if (ROOT / name).is_file():   # a tracked file deleted in the working tree is not part of it
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
    return copy


def fresh_shell(copy: Path) -> dict[str, str]:
    """The environment of a fresh shell in the copy: its code first, no inherited stores, no bytecode files."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MGBENCH_", "OPTUNA_"))}
    return env | {"PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}


def mgbench_run(copy: Path, args: list[str], timeout: int) -> subprocess.CompletedProcess:
    """`mgbench ARGS` run in the copy (the .venv's Python, the copy's mgbench)."""
    return subprocess.run([sys.executable, "-m", "mgbench", *args], cwd=copy, env=fresh_shell(copy),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def main_job(clean_copy):
    """The README's main job in the clean copy, shortened: (copy, its files before, the finished process)."""
    before = snapshot(clean_copy)
    args = mgbench_args(readme_commands()[1].argv)
    return clean_copy, before, mgbench_run(clean_copy, args + QUICK_SET, timeout=840)


@pytest.mark.slow
def test_the_main_job_renders_its_table_and_changes_nothing_outside_runs(main_job):
    copy, before, res = main_job
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    where = subprocess.run([sys.executable, "-c", "import mgbench; print(mgbench.__file__)"], cwd=copy,
                           env=fresh_shell(copy), capture_output=True, text=True, timeout=120)
    assert where.stdout.startswith(str(copy)), where   # the copy's code ran, not the checkout's
    table = re.search(r"`(runs/\S+\.md)`", README.read_text().split("## On a fresh machine")[1])[1]
    assert table in res.stdout, f"the main job does not say where its table ({table}) is:\n{res.stdout[-3000:]}"
    assert (copy / table).with_name("fig2_toy.png").is_file()
    assert changed_outside_runs(copy, before) == []   # the committed reports/ included
    assert sorted(p.name for p in (copy / "runs").iterdir()) == ["quickstart"]
    rows = table_rows((copy / table).read_text())
    assert len(rows) >= 12 and all(re.search(r"\d\.\d+", " ".join(r[1:])) for r in rows), rows   # cells filled
    committed = table_rows((copy / "reports" / "quickstart" / Path(table).name).read_text())
    assert [r[0] for r in rows] == [r[0] for r in committed], (
        f"the committed reports/quickstart/{Path(table).name} has other rows than the main job renders; re-render "
        f"it: mgbench study run {STUDY} --out reports/quickstart")


@pytest.mark.slow
@pytest.mark.parametrize("key", [key for key in after_main_job() if key in RUN_AFTER_MAIN_JOB])
def test_each_other_readme_command_runs_after_the_main_job(main_job, key):
    copy, _, res = main_job
    if res.returncode != 0:
        pytest.skip("the main job failed (test_the_main_job_renders_its_table_and_changes_nothing_outside_runs)")
    command = next(c for c in readme_commands() if c.key == key and mgbench_args(c.argv) is not None)
    args = [STUDY if PLACEHOLDER.search(a) else a for a in mgbench_args(command.argv)]
    before = snapshot(copy)
    done = mgbench_run(copy, args + RUN_AFTER_MAIN_JOB[key], timeout=840)
    assert done.returncode == 0, f"{command}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    assert changed_outside_runs(copy, before) == [], f"{command} wrote outside runs/"
    output = re.search(r"-> (runs/\S+)", command.comment)   # where the README says it writes
    if output:
        assert (copy / output[1].replace("<study>", Path(STUDY).stem)).exists(), f"{command}: no {output[1]}"
