"""Named points where tests kill the study driver, to prove that a rerun adopts what the dead one started.

`MGBENCH_KILL_AT=<point>` in the driver's environment makes it `os._exit(KILL_EXIT)` there: no cleanup, no
finally, as a SIGKILL or a lost node would. The points, in the order a trial passes them:

  asked          the trial is asked and claimed in Optuna; no MLflow run, no trial.json yet
  run_intent     trial.json records that its MLflow run is being created; no run yet
  run_created    the MLflow run exists (tagged study + trial number); trial.json does not name it yet
  submit_intent  trial.json records a submission token; nothing submitted yet
  submitted      sbatch (or the local controller) has the job; trial.json does not name it yet

A rerun of the same command must then train every trial exactly once, with one MLflow run each.
"""
from __future__ import annotations

import os

KILL_AT_ENV = "MGBENCH_KILL_AT"   # test hook: the driver exits at this point (one of POINTS)
KILL_EXIT = 75                    # the exit status of a driver killed at a point
POINTS = ("asked", "run_intent", "run_created", "submit_intent", "submitted")


def crash_point(name: str) -> None:
    """Exit at once (no cleanup) when MGBENCH_KILL_AT names this point."""
    assert name in POINTS, name
    if os.environ.get(KILL_AT_ENV) == name:
        os._exit(KILL_EXIT)
