"""`mgbench ui` without a browser: port checks, store resolution, and the command's start/Ctrl-C/stop cycle."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import STUDIES, TEST_STUDIES

from mgbench.ui import (DEFAULT_PORT, UiError, add_dashboard_parser, add_ui_parser, check_port_free, dashboard_command,
                        free_port, group_members, mark_study_experiment, resolve_args, runs_page_link, server_command,
                        start_dashboard, store_for_study)



def listening_socket(port: int = 0) -> socket.socket:
    """A plain TCP listener on 127.0.0.1 (something else holding the port)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", port))
    s.listen(1)
    return s


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mgbench")
    add_ui_parser(p.add_subparsers(dest="command", required=True))
    return p.parse_args(["ui", *argv])


def test_busy_port_is_one_clear_error_and_free_port_passes():
    with listening_socket() as s:
        port = s.getsockname()[1]
        with pytest.raises(UiError, match=rf"^port {port} on 127\.0\.0\.1 is busy .*--port$"):
            check_port_free("127.0.0.1", port)
    check_port_free("127.0.0.1", port)  # released: no error
    p = free_port()
    assert 1024 <= p <= 65535
    check_port_free("127.0.0.1", p)


def test_ui_command_on_busy_port_fails_fast_without_spawning_a_server(tmp_path):
    with listening_socket() as s:
        port = s.getsockname()[1]
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "mgbench.ui", "--backend-store-uri",
                            f"sqlite:///{tmp_path / 'mlflow.db'}", "--port", str(port)],
                           capture_output=True, text=True, timeout=60)
        elapsed = time.monotonic() - t0
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines == [f"mgbench ui: error: port {port} on 127.0.0.1 is busy (another server is listening there); "
                     f"pick another with --port"]
    assert r.stdout == ""
    assert elapsed < 20  # no mlflow server was started (that alone takes ~30 s here)
    assert not (tmp_path / "mlflow.db").exists()


def test_parser_defaults_and_store_of_a_study(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = parse([])
    assert (args.host, args.port, args.workers) == ("127.0.0.1", None, 1)
    assert args.func.__name__ == "cmd_ui"
    assert resolve_args(args) == (f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "mlartifacts"), DEFAULT_PORT)

    store = f"sqlite:///{tmp_path / 'db' / 'x.db'}"
    assert resolve_args(parse(["--backend-store-uri", store, "--port", "5123"])) == \
        (store, str(tmp_path / "db" / "mlartifacts"), 5123)

    # A study spec with the default (sqlite) tracking URI: serve its store and its artifact folder.
    out = (tmp_path / "runs" / "_test_ui").resolve()
    assert store_for_study(TEST_STUDIES / "_test_ui.yaml") == (f"sqlite:///{out / 'mlflow.db'}", str(out / "mlartifacts"),
                                                          None)
    # A spec that logs through a server: serve its folder's store on the port its URI names.
    spec = tmp_spec(tmp_path, "tracking_uri: http://127.0.0.1:5431")
    args = parse(["--study", str(spec), "--artifacts-destination", str(tmp_path / "arts")])
    assert resolve_args(args) == (f"sqlite:///{tmp_path / 'study' / 'mlflow.db'}", str(tmp_path / "arts"), 5431)
    with pytest.raises(SystemExit):  # --study and --backend-store-uri exclude each other
        parse(["--study", str(spec), "--backend-store-uri", store])


def test_server_command_serves_artifacts_on_loopback():
    cmd = server_command("sqlite:////x/mlflow.db", "/x/art", "127.0.0.1", 5999)
    assert cmd[:4] == [sys.executable, "-m", "mlflow", "server"]
    assert "--serve-artifacts" in cmd
    for flag, value in (("--backend-store-uri", "sqlite:////x/mlflow.db"), ("--artifacts-destination", "/x/art"),
                        ("--host", "127.0.0.1"), ("--port", "5999"), ("--workers", "1")):
        assert cmd[cmd.index(flag) + 1] == value


def test_group_members_sees_a_live_group_and_not_a_dead_one():
    p = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        assert group_members(p.pid) == [p.pid]
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    assert group_members(p.pid) == []


def tmp_spec(tmp_path: Path, extra: str = "") -> Path:
    """tests/studies/_test_ui.yaml with its base given by absolute path, out_dir in tmp_path, and `extra` lines."""
    spec = tmp_path / "spec.yaml"
    spec.write_text((TEST_STUDIES / "_test_ui.yaml").read_text().replace(
        "extends: ../../studies/base/grid2d.yaml",
        f"extends: {STUDIES / 'base' / 'grid2d.yaml'}\nout_dir: {tmp_path / 'study'}" + (f"\n{extra}" if extra else "")))
    return spec


# --- the study's page in the MLflow UI: classic ML view, its columns, images for every sample grid -----------

# The MLflow 3 web app's own names (read from its bundle, mlflow/server/js/build): written out here, not imported.
VIEW_TAG = "mlflow.sharedViewState.mgbench-trials"
TEST_UI_COLUMNS = ["params.`objective.w`", "params.`objective.label_drop`", "metrics.`eval/off_class`",
                   "metrics.`eval/off_class_se`"]


def test_runs_page_link_opens_the_saved_view_in_the_classic_ml_view():
    link = runs_page_link("http://127.0.0.1:5000", "17")
    assert link == ("http://127.0.0.1:5000/#/experiments/17/runs"
                    "?viewStateShareKey=mgbench-trials&workflowType=machine_learning")
    route, query = link.split("#", 1)[1].split("?")
    assert route == "/experiments/17/runs"
    assert dict(q.split("=") for q in query.split("&")) == {"viewStateShareKey": "mgbench-trials",
                                                            "workflowType": "machine_learning"}


def view_of(tags: dict[str, str]) -> tuple[dict, dict]:
    """(envelope without its state, decoded state) of the study's saved runs view."""
    envelope = json.loads(tags[VIEW_TAG])
    return {k: v for k, v in envelope.items() if k != "state"}, json.loads(envelope["state"])


def test_study_ui_tags_open_the_classic_view_with_params_and_objective_columns(tmp_path):
    from mgbench.study.spec import load_spec
    from mgbench.tracking import study_ui_tags

    tags = study_ui_tags(load_spec(tmp_spec(tmp_path)), now_ms=1234)
    assert set(tags) == {"mlflow.experimentKind", "mlflow.experiment.primaryMetric.name", VIEW_TAG}
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    assert tags["mlflow.experiment.primaryMetric.name"] == "eval/off_class"
    envelope, state = view_of(tags)
    assert envelope == {"name": "mgbench: trials", "createdAt": 1234, "updatedAt": 1234}
    assert state == {"searchFilter": "tags.`mgbench.role` = 'trial'", "orderByKey": "metrics.`eval/off_class`",
                     "orderByAsc": True, "selectedColumns": TEST_UI_COLUMNS,  # off_class: minimize, best first
                     "columnOrder": ["attributes.`Run Name`", "runDateAndNestInfo", "duration", *TEST_UI_COLUMNS],
                     "columnWidths": {c: 170 for c in TEST_UI_COLUMNS}}
    # A named grid of settings: its trainer keys become the columns (each once); maximize sorts descending.
    spec = tmp_path / "bundles.yaml"
    spec.write_text(f"name: bundles\nextends: {STUDIES / 'base' / 'grid2d.yaml'}\nout_dir: {tmp_path / 'b'}\n"
                    "space:\n  variant: {grid: [{objective.w: 1.0}, {objective.w: 1.5, objective.label_drop: 0.2}]}\n"
                    "  train.seed: {grid: [0, 1]}\nsampler: grid\noptimize: {metric: in_class, direction: maximize}\n")
    _, state = view_of(study_ui_tags(load_spec(spec)))
    assert state["selectedColumns"] == ["params.`objective.w`", "params.`objective.label_drop`", "params.`train.seed`",
                                        "metrics.`eval/in_class`", "metrics.`eval/in_class_se`"]
    assert (state["orderByKey"], state["orderByAsc"]) == ("metrics.`eval/in_class`", False)


def test_study_experiment_is_created_with_the_ui_tags_and_an_older_one_gets_them(tmp_path):
    from mgbench.tracking import mlflow_client

    from mgbench.study import runs
    from mgbench.study.spec import load_spec

    spec = load_spec(tmp_spec(tmp_path))
    exp_id = runs.experiment_id(runs.open_store(spec), spec)  # what `study run` does first
    tags = mlflow_client(spec.tracking_uri).get_experiment(exp_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    assert tags["mgbench.study"] == "_test_ui"
    assert view_of(tags)[1]["selectedColumns"] == TEST_UI_COLUMNS
    # An experiment made before these tags existed: `mgbench ui --study` adds them.
    (tmp_path / "old").mkdir()
    other = load_spec(tmp_spec(tmp_path / "old"))
    client = mlflow_client(other.tracking_uri)
    assert mark_study_experiment(other.tracking_uri, other) is None  # no experiment yet: nothing is created
    assert client.get_experiment_by_name("_test_ui") is None
    old_id = client.create_experiment("_test_ui")
    assert mark_study_experiment(other.tracking_uri, other) == old_id
    tags = client.get_experiment(old_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    assert view_of(tags)[1]["selectedColumns"] == TEST_UI_COLUMNS


def test_every_npz_sample_grid_is_logged_with_a_png(tmp_path):
    from PIL import Image

    from mgbench.config import train_config_from_dict
    from mgbench.tracking import MemoryTracker
    from mgbench.trainer.loop import train

    cfg = train_config_from_dict({
        "name": "pngs", "out_dir": str(tmp_path / "run"), "data": {"name": "grid2d"}, "model": {"arch": "MLP-S"},
        "objective": {"w": 1.5}, "optim": {"batch_size": 32}, "train": {"steps": 4, "log_every": 2, "ckpt_every": 4},
        "sample": {"steps": 3, "n_grid": 16}, "eval": {"cfg_sweep": [1.0, 2.5]}}, "test")
    tracker = MemoryTracker()
    train(cfg, tracker)
    logged = {Path(p).name: folder for p, folder in tracker.artifacts}
    npz = sorted(n for n in logged if n.endswith(".npz"))
    assert npz == ["samples.npz", "samples_cfg_1.00.npz", "samples_cfg_2.50.npz"]  # kept for the reports
    png_of = {"samples.npz": "step_00000004.png", "samples_cfg_1.00.npz": "step_00000004_cfg_1.00.png",
              "samples_cfg_2.50.npz": "step_00000004_cfg_2.50.png"}
    assert sorted(n for n in logged if n.endswith(".png")) == sorted(png_of.values())
    assert {logged[n] for n in [*npz, *png_of.values()]} == {"samples"}
    pixels = {}
    for name in png_of.values():
        with Image.open(tmp_path / "run" / "samples" / name) as img:
            assert img.format == "PNG" and img.size == (400, 400)  # figsize 4 in x dpi 100
            pixels[name] = np.asarray(img.convert("RGB"))
    a, b, c = pixels.values()
    assert not np.array_equal(a, b) and not np.array_equal(b, c)  # other points (and titles) in each grid


@pytest.mark.slow
def test_ui_command_serves_a_study_until_ctrl_c_then_leaves_nothing_behind(tmp_path):
    import torch

    from mgbench.study.runner import run_study
    from mgbench.study.spec import load_spec

    torch.set_num_threads(1)
    spec = tmp_spec(tmp_path)
    assert run_study(load_spec(spec), echo=lambda s: None).n_complete == 2  # logs to the study's own sqlite
    port = free_port()
    # SIGINT as a terminal's Ctrl-C sends it (restored to default: a background pytest may ignore it).
    proc = subprocess.Popen([sys.executable, "-m", "mgbench.ui", "--study", str(spec), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    server_pgids: set[int] = set()
    try:
        first = proc.stdout.readline()
        assert first == f"starting mlflow server on 127.0.0.1:{port} (store sqlite:///{tmp_path / 'study' / 'mlflow.db'}) ...\n"
        ready = proc.stdout.readline()  # blocks until the server answers (or the command fails)
        assert ready.startswith(f"MLflow UI at http://127.0.0.1:{port}  (store sqlite:///"), ready
        link_line, columns_line = proc.stdout.readline(), proc.stdout.readline()
        url = f"http://127.0.0.1:{port}"
        server_pgids = {os.getpgid(pid) for pid in _listeners(port)}
        assert server_pgids and proc.pid not in server_pgids  # the server leads its own group
        with urllib.request.urlopen(f"{url}/ajax-api/2.0/mlflow/experiments/get-by-name?experiment_name=_test_ui",
                                    timeout=10) as r:
            exp = json.load(r)["experiment"]
        exp_id = exp["experiment_id"]
        assert link_line == (f"study _test_ui: {url}/#/experiments/{exp_id}/runs"
                             f"?viewStateShareKey=mgbench-trials&workflowType=machine_learning\n")
        assert columns_line == ("  (its trials with columns objective.w, objective.label_drop, eval/off_class and its "
                                "SE; best first)\n")
        tags = {t["key"]: t["value"] for t in exp["tags"]}
        assert tags["mlflow.experimentKind"] == "custom_model_development" and VIEW_TAG in tags
        runs = _post(f"{url}/ajax-api/2.0/mlflow/runs/search", {"experiment_ids": [exp_id]})["runs"]
        names = {r["info"]["run_name"]: r["info"]["run_id"] for r in runs}
        assert set(names) == {"_test_ui", "w=1.00 lambda=0.10", "w=1.50 lambda=0.10"}
        # The study's artifacts (a local folder, not proxied) are served to the UI over HTTP.
        with urllib.request.urlopen(f"{url}/get-artifact?path=samples/step_00000040.png"
                                    f"&run_uuid={names['w=1.00 lambda=0.10']}", timeout=10) as r:
            assert r.read(8) == b"\x89PNG\r\n\x1a\n"
        with pytest.raises(UiError, match="is busy"):
            check_port_free("127.0.0.1", port)
        os.kill(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        for pgid in {proc.pid, *server_pgids}:
            if group_members(pgid):
                os.killpg(pgid, signal.SIGKILL)
    assert proc.returncode == 0, out
    assert "stopping the mlflow server" in out
    check_port_free("127.0.0.1", port)
    assert all(group_members(g) == [] for g in server_pgids)


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def _listeners(port: int) -> list[int]:
    """Pids with a listening TCP socket on `port` (from /proc/net/tcp and each process's fds)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if int(f[1].split(":")[1], 16) == port and f[3] == "0A":
            inodes.add(f[9])
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            links = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        except OSError:
            continue
        if any(f"socket:[{i}]" in links for i in inodes):
            pids.append(int(pid))
    return pids


def test_dashboard_without_the_package_is_one_clear_line(tmp_path, capsys):
    if importlib.util.find_spec("optuna_dashboard") is not None:
        pytest.skip("optuna-dashboard is installed here")
    p = argparse.ArgumentParser(prog="mgbench")
    add_dashboard_parser(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(["dashboard", "--storage", f"sqlite:///{tmp_path / 'optuna.db'}", "--port", "0"])
    assert args.func(args) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "mgbench dashboard: error: optuna-dashboard is not installed (pip install optuna-dashboard); it is optional"]


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_dashboard_serves_a_study_and_stops_cleanly(tmp_path, kind):
    pytest.importorskip("optuna_dashboard", reason="optuna-dashboard is optional and not installed")
    import optuna

    from mgbench.study.optuna_io import make_storage

    uri = f"sqlite:///{tmp_path / 'optuna.db'}" if kind == "sqlite" else f"journal://{tmp_path / 'journal.log'}"
    study = optuna.create_study(study_name="_test_ui", storage=make_storage(uri))
    for x in (1.0, 2.0, 3.0):
        study.enqueue_trial({"x": x})
    study.optimize(lambda t: (t.suggest_float("x", 0, 4) - 2) ** 2, n_trials=3)
    assert dashboard_command(uri, "127.0.0.1", 1)[3:5] == (
        [uri, "--host"] if kind == "sqlite" else [str(tmp_path / "journal.log"), "--storage-class"])
    srv = start_dashboard(uri, port=0, log_path=tmp_path / "dashboard.log")
    try:
        with urllib.request.urlopen(f"{srv.url}/api/studies", timeout=10) as r:
            studies = json.load(r)["study_summaries"]
        assert [s["study_name"] for s in studies] == ["_test_ui"]
        with urllib.request.urlopen(f"{srv.url}/api/studies/{studies[0]['study_id']}", timeout=10) as r:
            trials = json.load(r)["trials"]
        assert sorted(t["values"][0] for t in trials) == [0.0, 1.0, 1.0]  # (x - 2)^2 at x = 1, 2, 3
    finally:
        srv.stop()
    assert group_members(srv.pgid) == []
    check_port_free("127.0.0.1", int(srv.url.rsplit(":", 1)[1]))
