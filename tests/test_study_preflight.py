"""Preflight: `study run` refuses, with one line and exit 2 and before anything exists, a tracking server that
does not answer, a runs folder it cannot write, a disk below the free-space threshold; `study validate` runs the
trainer's start-up checks on every trial config and names each failing one.

Servers are real: a port where nothing listens, a socket that accepts and never answers, a small HTTP server.
Folders are real: below a file, a read-only tmpfs, a 1 MiB tmpfs (the mounts need root; skipped otherwise).
"""
from __future__ import annotations

import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from conftest import mgbench_env

from mgbench.cli import main as mgbench_main
from mgbench.study.preflight import (MIN_FREE_GIB, check_environment, disk_problem, folder_problem, job_world_size,
                                     server_problem)
from mgbench.study.spec import load_spec



def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_spec(tmp: Path, spec: dict) -> Path:
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _good(good_study: dict, tmp: Path, **changes) -> Path:
    spec = {**good_study, "out_dir": str(tmp / "out"), **changes}
    return _write_spec(tmp, spec)


def _cli(argv: list[str], capsys) -> tuple[int, list[str], str]:
    rc = mgbench_main(argv)
    out, err = capsys.readouterr()
    return rc, err.strip().splitlines(), out


@pytest.fixture
def mount_tmpfs(tmp_path):
    """mount_tmpfs(options) -> a fresh tmpfs folder (root only; skipped where mounting is not allowed)."""
    mounted = []

    def mount(options: str) -> Path:
        mnt = tmp_path / f"mnt{len(mounted)}"
        mnt.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        if subprocess.run(["umount", str(mnt)]).returncode:
            subprocess.run(["umount", "-l", str(mnt)])


# ----------------------------------------------------------------------------- the tracking server


def test_an_unreachable_tracking_server_is_one_line_and_nothing_is_created(good_study, tmp_path):
    port = _free_port()  # nothing listens there
    spec = _good(good_study, tmp_path, tracking_uri=f"http://127.0.0.1:{port}")
    env = mgbench_env()
    proc = subprocess.run([sys.executable, "-m", "mgbench", "study", "run", str(spec)], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"mgbench study run: error: {spec}:tracking_uri: http://127.0.0.1:{port} does not "
                           "answer (ConnectionRefusedError")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.yaml", "study.yaml"]   # no out_dir, no storage


def test_an_unreachable_database_storage_is_refused(good_study, tmp_path, capsys):
    port = _free_port()
    spec = _good(good_study, tmp_path, storage=f"postgresql://mg:secret@127.0.0.1:{port}/optuna")
    rc, err, _ = _cli(["study", "run", str(spec)], capsys)
    assert rc == 2 and len(err) == 1
    assert err[0].startswith(f"mgbench study run: error: {spec}:storage: postgresql://mg:***@127.0.0.1:{port}/optuna "
                             "does not answer (ConnectionRefusedError")
    assert "secret" not in err[0] and not (tmp_path / "out").exists()


def test_a_server_that_never_answers_is_given_up_on():
    with socket.socket() as s:  # accepts connections (the kernel's backlog) and never sends a byte
        s.bind(("127.0.0.1", 0))
        s.listen(4)
        problem = server_problem(f"http://127.0.0.1:{s.getsockname()[1]}", timeout_s=0.5)
    assert problem is not None and "does not answer (" in problem
    assert "timed out" in problem or "no answer within 0.5 s" in problem


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200
    paths: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        _Health.paths.append(self.path)
        self.send_response(_Health.status)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_an_answering_server_passes_and_a_failing_one_is_named():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        _Health.paths.clear()
        assert server_problem(uri) is None
        assert server_problem(uri + "/mlflow/") is None          # behind a path prefix
        assert _Health.paths == ["/health", "/mlflow/health"]
        _Health.status = 401                                     # asks for a login: it is up
        assert server_problem(uri) is None
        _Health.status = 503
        assert "GET /health answers HTTP 503" in server_problem(uri)
    finally:
        _Health.status = 200
        server.shutdown()
        server.server_close()


def test_local_stores_need_no_server(good_study, tmp_path):
    assert server_problem(f"sqlite:///{tmp_path}/x.db") is None
    assert server_problem(f"file://{tmp_path}/mlruns") is None
    check_environment(load_spec(_good(good_study, tmp_path)))   # the good spec passes, creating nothing
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- the runs folder and the disk


def test_a_runs_folder_below_a_file_is_refused(good_study, tmp_path, capsys):
    (tmp_path / "afile").write_text("not a folder")
    spec = _good(good_study, tmp_path, out_dir=str(tmp_path / "afile" / "runs"))
    rc, err, _ = _cli(["study", "run", str(spec)], capsys)
    assert rc == 2 and len(err) == 1
    assert err[0].startswith(f"mgbench study run: error: {spec}:out_dir: '{tmp_path / 'afile'}' is a file")
    assert (tmp_path / "afile").read_text() == "not a folder"


def test_a_read_only_runs_folder_is_refused(good_study, tmp_path, capsys, mount_tmpfs):
    ro = mount_tmpfs("ro,size=1m")   # read-only for root too (permission bits would not stop root)
    spec = _good(good_study, tmp_path, out_dir=str(ro / "runs"))
    rc, err, _ = _cli(["study", "run", str(spec)], capsys)
    assert rc == 2 and len(err) == 1
    assert err[0].startswith(f"mgbench study run: error: {spec}:out_dir: cannot create '{ro / 'runs'}' in '{ro}' "
                             "(OSError: [Errno 30] Read-only file system")
    assert os.listdir(ro) == []


def test_an_existing_read_only_runs_folder_is_refused(mount_tmpfs):
    ro = mount_tmpfs("ro,size=1m")
    problem = folder_problem(ro)
    assert problem.startswith(f"cannot write in '{ro}' (OSError: [Errno 30] Read-only file system")


def test_a_disk_below_the_threshold_is_refused(good_study, tmp_path, capsys, mount_tmpfs):
    small = mount_tmpfs("size=1m")
    spec = _good(good_study, tmp_path, out_dir=str(small / "runs"))
    rc, err, _ = _cli(["study", "run", str(spec)], capsys)
    free = shutil.disk_usage(small).free / 2**30
    assert rc == 2 and len(err) == 1
    assert err[0] == (f"mgbench study run: error: {spec}:out_dir: {free:.3g} GiB free on the file system of "
                      f"'{small}', below the {MIN_FREE_GIB:g} GiB required (free space or choose another folder; "
                      "the threshold is `study run --min-free-gib`)")
    assert os.listdir(small) == []
    assert disk_problem(small / "runs", free / 2) is None                 # above a lower threshold: fine
    assert disk_problem(small / "runs", free * 2) is not None


def test_the_free_disk_threshold_is_a_command_line_knob(good_study, tmp_path, capsys):
    spec = _good(good_study, tmp_path)
    huge = 2 * shutil.disk_usage(tmp_path).total / 2**30
    rc, err, _ = _cli(["study", "run", str(spec), "--min-free-gib", f"{huge:.0f}"], capsys)
    assert rc == 2 and len(err) == 1 and f"below the {huge:.0f} GiB required" in err[0]
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- study validate: start-up checks


def _imagefolder_spec(tmp: Path, good_study: dict, base: dict, space: dict, executor="debug") -> Path:
    """An imagefolder study: two class folders of PNGs, a VAE folder whose config halves the side twice."""
    from PIL import Image

    for name in ("cat", "dog"):
        (tmp / "images" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp / "images" / name / "0.png")
    (tmp / "vae").mkdir()
    (tmp / "vae" / "config.json").write_text('{"latent_channels": 4, "block_out_channels": [32, 64, 64]}')
    (tmp / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"")   # validate reads no weights
    (tmp / "inception.pth").write_bytes(b"")
    spec = {**good_study, "out_dir": str(tmp / "out"), "space": space, "executor": executor,
            "base": {"data": {"name": "imagefolder", "path": str(tmp / "images"), "vae": str(tmp / "vae"),
                              "image_size": 40},   # latents 10x10
                     "model": {"arch": "DiT-XS/2"}, "optim": {"batch_size": 8},
                     "eval": {"inception_weights": str(tmp / "inception.pth")},
                     "train": {"steps": 10, "device": "cpu"}, **base}}
    for key in ("extends", "eval_hook"):  # mgbench's own evaluation: its weights file is checked
        spec.pop(key)
    spec["optimize"] = {"metric": "fid", "direction": "minimize"}
    return _write_spec(tmp, spec)


def test_validate_names_each_trial_whose_patch_does_not_divide_the_latents(good_study, tmp_path, capsys):
    space = {"model.arch": {"grid": ["DiT-XS/2", "DiT-XS/4", "DiT-T/4"]}}
    spec = _imagefolder_spec(tmp_path, good_study, {}, space)
    rc, err, out = _cli(["study", "validate", str(spec)], capsys)
    allowed = "DiT-XS/2, DiT-T/2, DiT-S/2, DiT-B/2, DiT-L/2, DiT-XL/2"
    assert rc == 2 and "ok" not in out
    assert err == [f"mgbench study validate: error: {spec}:space.model.arch: {arch}: input 10x10 is not divisible by "
                   f"the patch size 4 (the VAE latents of data.image_size 40) (allowed: {allowed}) "
                   f"(trial {{'model.arch': '{arch}'}})" for arch in ("DiT-XS/4", "DiT-T/4")]


def test_validate_reports_every_start_up_problem_by_its_field(good_study, tmp_path, capsys):
    spec = _imagefolder_spec(tmp_path, good_study, {}, {"objective.w": {"grid": [1.0, 1.5]}}, executor="local")
    (tmp_path / "images" / "dog" / "0.png").unlink()          # an empty class folder
    (tmp_path / "inception.pth").unlink()                    # a weights file gone
    raw = yaml.safe_load(spec.read_text())
    raw["executor"] = {"type": "local", "tasks_per_node": 3}  # 3 ranks for a batch of 8
    spec.write_text(yaml.safe_dump(raw))
    rc, err, _ = _cli(["study", "validate", str(spec)], capsys)
    fields = [line.split(": error: ", 1)[1].split(": ", 1)[0] for line in err]
    assert rc == 2
    assert fields == [f"{spec}:base.data.path", f"{spec}:base.optim.batch_size", f"{spec}:base.eval.inception_weights"] * 2
    assert "class folder 'dog' " in err[0] and err[0].endswith("(trial {'objective.w': 1.0})")
    assert "8 is not divisible by 3 ranks" in err[1]


def test_validate_passes_a_good_imagefolder_study(good_study, tmp_path, capsys):
    spec = _imagefolder_spec(tmp_path, good_study, {}, {"objective.w": {"grid": [1.0, 1.5]}})
    rc, err, out = _cli(["study", "validate", str(spec)], capsys)
    assert (rc, err) == (0, []) and f"{spec}: ok" in out
    assert not (tmp_path / "out").exists()


def test_job_world_size_follows_the_executor():
    assert job_world_size("debug", {"tasks_per_node": 4}) == 1
    assert job_world_size("local", {"tasks_per_node": 2, "nodes": 3}) == 2
    assert job_world_size("slurm", {"tasks_per_node": 2, "slurm_nodes": 3}) == 6
    assert job_world_size("slurm", {"tasks_per_node": 2, "slurm_ntasks_per_node": 4}) == 4
