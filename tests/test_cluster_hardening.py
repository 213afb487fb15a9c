"""The test cluster and services as a site would want them: loopback only, secrets private, a dead daemon
restarted alone with its state, and `down` leaving no process behind.

The first tests look at the running cluster and services of `slurm/ci.sh up` (skipped when absent). The
restart tests start their own private cluster (slurm/cluster.sh with a temporary MGBENCH_SLURM_DIR), so
killing its daemons never disturbs the shared one; they need root and an installed Slurm.
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

import procview as pv
from conftest import ROOT, slurm_conf

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]
CLUSTER_DAEMONS = ("slurmctld", "slurmd", "slurmdbd", "mariadbd")  # munged has only a unix socket
SERVICE_DAEMONS = ("postgres", "mlflow")


def shared_dirs() -> tuple[Path, Path]:
    """(cluster folder, services folder) of the running test cluster, or skip."""
    conf = slurm_conf()
    if conf is None:
        pytest.skip('no SLURM test cluster: slurm/ci.sh up && . "$MGBENCH_SLURM_DIR/env.sh"')
    cluster = conf.parent.parent
    base = Path(os.environ.get("MGBENCH_SLURM_DIR") or cluster.parent)
    return cluster, base / "services"


def daemon_pids(run_dir: Path, names: tuple[str, ...]) -> dict[str, int]:
    """name -> PID from the scripts' PID files; fails unless every daemon is alive."""
    pids = {n: pv.read_pidfile(run_dir / f"{n}.pid") for n in names}
    dead = [n for n, p in pids.items() if p is None or not pv.alive(p)]
    assert not dead, f"not running: {dead} (PID files in {run_dir})"
    return pids


def expected_ports(cluster: Path) -> dict[str, int]:
    """The ports the configs give each daemon (an oracle independent of the PID files)."""
    etc = cluster / "etc"
    return {"slurmctld": int(pv.conf_value(etc / "slurm.conf", "SlurmctldPort")),
            "slurmd": int(pv.conf_value(etc / "slurm.conf", "SlurmdPort")),
            "slurmdbd": int(pv.conf_value(etc / "slurmdbd.conf", "DbdPort")),
            "mariadbd": int(pv.conf_value(etc / "slurmdbd.conf", "StoragePort"))}


def assert_loopback_only(pids: dict[str, int], ports: dict[str, int]) -> None:
    """Each daemon listens on its expected port, and every socket it (or a child) listens on is loopback."""
    for name, pid in pids.items():
        socks = pv.listeners({pid})
        assert (name not in ports) or any(port == ports[name] for _, port in socks), (name, ports.get(name), socks)
        assert socks, f"{name} listens on nothing"
        wide = sorted(s for s in socks if not pv.loopback(s[0]))
        assert not wide, f"{name} (pid {pid}) listens beyond loopback: {wide}"


def assert_private(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode & 0o077 == 0, f"{path} is {oct(mode)}: it holds a secret (want 600)"


def pg_password() -> str:
    url = os.environ.get("MGBENCH_PG_URL")
    if not url:
        pytest.skip('MGBENCH_PG_URL unset: slurm/ci.sh up && . "$MGBENCH_SLURM_DIR/env.sh"')
    password = urlsplit(url).password
    assert password, "MGBENCH_PG_URL carries no password"
    return password


# ----------------------------------------------------------------------------- the shared cluster and services


def test_shared_cluster_and_services_listen_on_loopback_only() -> None:
    cluster, services = shared_dirs()
    assert_loopback_only(daemon_pids(cluster / "run", CLUSTER_DAEMONS), expected_ports(cluster))
    if not (services / "run").is_dir():
        pytest.skip("services not started (slurm/services.sh start)")
    ports = {}
    for name, var in (("postgres", "MGBENCH_PG_URL"), ("mlflow", "MGBENCH_MLFLOW_URL")):
        if os.environ.get(var):
            ports[name] = urlsplit(os.environ[var]).port
    assert_loopback_only(daemon_pids(services / "run", SERVICE_DAEMONS), ports)


def test_shared_secrets_are_private_and_on_no_command_line() -> None:
    cluster, services = shared_dirs()
    for path in (cluster / "mysql" / "slurm.password", cluster / "etc" / "slurmdbd.conf",
                 cluster / "munge" / "munge.key"):
        assert_private(path)
    secrets = [(cluster / "mysql" / "slurm.password").read_text().strip()]
    if (services / "pg.password").is_file():
        for name in ("pg.password", "pgpass", "env.sh"):
            assert_private(services / name)
        secrets.append((services / "pg.password").read_text().strip())
        assert secrets[-1] == pg_password()
        mlflow = daemon_pids(services / "run", ("mlflow",))["mlflow"]
        assert "--backend-store-uri postgresql" in pv.cmdline(mlflow)  # the URI is there, its password is not
    ci_env = cluster.parent / "env.sh"
    if ci_env.is_file():
        assert_private(ci_env)
    commands = "\n".join(pv.cmdline(p) for p in pv.all_pids())
    if shutil.which("ps"):
        commands += subprocess.run(["ps", "-e", "-ww", "-o", "args"], capture_output=True, text=True).stdout
    assert all(len(s) >= 16 for s in secrets)  # random hex: a hit cannot be a coincidence
    assert not [s for s in secrets if s in commands], "a password is visible on a command line"


# ----------------------------------------------------------------------------- a private cluster: dead daemons


class Cluster:
    """A private cluster of slurm/cluster.sh in its own folder, driven by its scripts and Slurm's commands."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.dir = base / "cluster"
        self.conf = self.dir / "etc" / "slurm.conf"
        self.env = {**os.environ, "MGBENCH_SLURM_DIR": str(base), "SLURM_CONF": str(self.conf)}

    def script(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        res = subprocess.run(["bash", *args], cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)
        assert res.returncode == 0, f"{args}: rc {res.returncode}\n{res.stderr[-3000:]}"
        return res

    def slurm(self, *args: str) -> str:
        res = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, f"{args}: {res.stderr}"
        return res.stdout.strip()

    def sbatch(self, command: str) -> int:
        return int(self.slurm("sbatch", "--parsable", "-p", "cpu", "-o", "/dev/null", "--wrap", command).split(";")[0])

    def pids(self) -> dict[str, int]:
        return daemon_pids(self.dir / "run", ("munged", *CLUSTER_DAEMONS))

    def processes(self) -> set[int]:
        """Every living process of this cluster: daemons, job steps and jobs all inherit its SLURM_CONF."""
        return pv.with_env("SLURM_CONF", str(self.conf))

    def job_steps(self) -> set[int]:
        return {p for p in self.processes() if pv.comm(p) == "slurmstepd"}

    def wait_state(self, job: int, want: str, timeout: float = 60, accounting: bool = False) -> None:
        """Wait until slurmctld (squeue), or with `accounting` slurmdbd (sacct, which lags), shows the job in `want`."""
        deadline, seen = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            if accounting:
                seen = self.slurm("sacct", "-X", "-n", "-P", "-j", str(job), "-o", "State")
            else:
                seen = self.slurm("scontrol", "show", "job", str(job), "-o").split("JobState=")[1].split()[0]
            if seen == want:
                return
            time.sleep(0.3)
        pytest.fail(f"job {job} never {want} (last {seen!r})")

    def wait_accounted(self, last: int, timeout: float = 60) -> None:
        """Wait until accounting lists exactly the jobs 1..last (a listing lags `sacct -j` by seconds)."""
        deadline, ids = time.monotonic() + timeout, []
        while time.monotonic() < deadline:
            ids = [int(j) for j in self.slurm("sacct", "-a", "-X", "-n", "-P", "-o", "JobID").split()]
            if ids == list(range(1, last + 1)):
                return
            time.sleep(0.5)
        pytest.fail(f"accounting lists jobs {ids}, not 1..{last}")


@pytest.fixture(scope="module")
def private_cluster(tmp_path_factory) -> Cluster:
    """A fresh private cluster, stopped (every process) at the end."""
    if shutil.which("slurmctld") is None or shutil.which("mariadbd") is None:
        pytest.skip("Slurm is not installed: bash slurm/cluster.sh install")
    if os.geteuid() != 0:
        pytest.skip("the test cluster runs its daemons and jobs as root")
    c = Cluster(tmp_path_factory.mktemp("hardening"))
    try:
        c.script("slurm/cluster.sh", "start")
        yield c
    finally:
        subprocess.run(["bash", "slurm/cluster.sh", "stop"], cwd=ROOT, env=c.env, capture_output=True, timeout=120)


def test_private_cluster_listens_on_loopback_only_and_keeps_secrets_private(private_cluster: Cluster) -> None:
    c = private_cluster
    assert_loopback_only({n: p for n, p in c.pids().items() if n != "munged"}, expected_ports(c.dir))
    for path in (c.dir / "mysql" / "slurm.password", c.dir / "etc" / "slurmdbd.conf", c.dir / "munge" / "munge.key"):
        assert_private(path)


def test_dead_slurmd_is_restarted_alone_and_the_running_job_lives_on(private_cluster: Cluster) -> None:
    c = private_cluster
    first = c.sbatch("sleep 20")
    c.wait_state(first, "RUNNING")
    before, steps = c.pids(), c.job_steps()
    assert len(steps) == 1  # the batch step of the sleeping job
    os.kill(before["slurmd"], 9)
    deadline = time.monotonic() + 10
    while pv.alive(before["slurmd"]):
        assert time.monotonic() < deadline, "slurmd survived SIGKILL"
        time.sleep(0.1)
    res = c.script("slurm/cluster.sh", "start")
    assert "restarting slurmd (state kept)" in res.stderr, res.stderr
    after = c.pids()
    assert after["slurmd"] != before["slurmd"]
    assert {n: p for n, p in after.items() if n != "slurmd"} == {n: p for n, p in before.items() if n != "slurmd"}
    assert c.job_steps() == steps  # the job's slurmstepd was neither killed nor orphaned
    c.wait_state(first, "COMPLETED", timeout=90)  # slurmd re-attached to the step and saw it finish
    second = c.sbatch("true")
    assert second == first + 1  # the job id sequence goes on: no id is handed out twice
    c.wait_state(second, "COMPLETED")
    c.wait_state(first, "COMPLETED", accounting=True)  # accounting still knows the job from before the restart


def test_dead_slurmctld_and_accounting_restart_with_their_state(private_cluster: Cluster) -> None:
    c = private_cluster
    last = c.sbatch("true")
    c.wait_state(last, "COMPLETED", accounting=True)
    # slurmctld writes its state throttled, a few seconds late: SIGKILLed 1.8 s after a submission it lost the job
    # and handed its id out again (measured; Slurm's own limit, not the scripts'). Wait that window out.
    time.sleep(6)
    c.wait_accounted(last)
    before = c.pids()
    for name in ("slurmctld", "slurmdbd", "mariadbd"):
        os.kill(before[name], 9)
    res = c.script("slurm/cluster.sh", "start")
    assert "restarting mariadbd slurmdbd slurmctld (state kept)" in res.stderr, res.stderr
    after = c.pids()
    assert after["slurmd"] == before["slurmd"] and after["munged"] == before["munged"]
    job = c.sbatch("true")
    assert job == last + 1
    c.wait_state(job, "COMPLETED")
    c.wait_accounted(job)  # accounting kept every earlier job


def test_down_stops_every_process_it_started_job_steps_included(private_cluster: Cluster) -> None:
    c = private_cluster
    job = c.sbatch("sleep 300")
    c.wait_state(job, "RUNNING")
    # slurmctld says RUNNING when it has handed the job to slurmd, which may not have forked the step yet
    deadline = time.monotonic() + 30
    while not ({pv.comm(p) for p in c.processes()} >= {"slurmstepd", "sleep"}) and time.monotonic() < deadline:
        time.sleep(0.2)
    procs = c.processes()
    steps = c.job_steps()
    assert steps and {pv.comm(p) for p in procs} >= {"munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd", "sleep"}
    c.script("slurm/ci.sh", "down")
    deadline = time.monotonic() + 15
    while c.processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    left = {p: pv.cmdline(p) for p in c.processes()}
    assert not left, f"left running after down: {left}"
    assert not [p for p in procs if pv.alive(p)]


# ----------------------------------------------------------------------------- private services: a dead one alone


class Services:
    """A private PostgreSQL + MLflow server of slurm/services.sh in its own folder."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.run_dir = base / "services" / "run"
        self.env = {**os.environ, "MGBENCH_SLURM_DIR": str(base)}

    def script(self, *args: str) -> subprocess.CompletedProcess:
        res = subprocess.run(["bash", "slurm/services.sh", *args], cwd=ROOT, env=self.env, capture_output=True,
                             text=True, timeout=240)
        assert res.returncode == 0, f"{args}: rc {res.returncode}\n{res.stderr[-3000:]}"
        return res

    def urls(self) -> dict[str, str]:
        """MGBENCH_PG_URL and MGBENCH_MLFLOW_URL as `services.sh env` prints them."""
        lines = self.script("env").stdout.split()
        return dict(line.split("=", 1) for line in lines if "=" in line)

    def pids(self) -> dict[str, int]:
        return daemon_pids(self.run_dir, SERVICE_DAEMONS)

    def kill(self, name: str) -> None:
        """SIGKILL the service's leader only: its children (MLflow's server worker, PostgreSQL's backends) live on,
        as after an OOM kill, and hold its port or its shared memory."""
        pid = self.pids()[name]
        os.kill(pid, 9)
        deadline = time.monotonic() + 10
        while pv.alive(pid):
            assert time.monotonic() < deadline, f"{name} survived SIGKILL"
            time.sleep(0.1)


@pytest.fixture(scope="module")
def private_services() -> Services:
    """Fresh private services, stopped at the end. The folder is under /tmp, not pytest's (mode 700) tmp folder,
    so that the postgres user can reach its data directory."""
    import tempfile

    if not list(Path("/usr/lib/postgresql").glob("*/bin/postgres")):
        pytest.skip("PostgreSQL is not installed: bash slurm/services.sh install")
    if os.geteuid() != 0:
        pytest.skip("the services script runs PostgreSQL as the postgres user (needs root)")
    s = Services(Path(tempfile.mkdtemp(prefix="mgbench-services-test-")))
    try:
        s.script("start")
        yield s
    finally:
        subprocess.run(["bash", "slurm/services.sh", "stop"], cwd=ROOT, env=s.env, capture_output=True, timeout=120)
        shutil.rmtree(s.base, ignore_errors=True)


def test_dead_service_is_restarted_alone_on_its_port(private_services: Services) -> None:
    from mgbench.tracking import RunStore

    s = private_services
    urls, before = s.urls(), s.pids()
    store = RunStore(urls["MGBENCH_MLFLOW_URL"])
    run_id = store.start_run(store.experiment("restart-alone"), "before", {"mgbench.test": "1"})
    store.log_values(run_id, {"loss": 1.0}, step=0)

    s.kill("mlflow")
    res = s.script("start")
    assert "restarting mlflow (ports kept)" in res.stderr, res.stderr
    after = s.pids()
    assert after["postgres"] == before["postgres"] and after["mlflow"] != before["mlflow"]
    assert s.urls() == urls  # the URLs that running jobs hold stay valid
    store.log_values(run_id, {"loss": 0.5}, step=1)  # the same client, the same URL, a new server

    s.kill("postgres")
    res = s.script("start")
    assert "restarting postgres (ports kept)" in res.stderr, res.stderr
    again = s.pids()
    assert again["mlflow"] == after["mlflow"] and again["postgres"] != before["postgres"]
    assert s.urls() == urls
    store.log_values(run_id, {"loss": 0.25}, step=2)  # the MLflow server reconnects to the restarted database
    assert store.history(run_id, "loss") == [(0, 1.0), (1, 0.5), (2, 0.25)]

    assert "services already running" in s.script("start").stderr
    assert s.pids() == again
