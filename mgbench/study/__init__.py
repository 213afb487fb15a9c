"""Studies: a YAML spec -> Optuna (ask/tell) -> submitit jobs -> MLflow runs; resumable, no idle slots.

spec.py (the file), space.py (search space, trial configs), spec_checks.py (entries, URIs, metrics),
optuna_io.py (storages, samplers, pruners), executors.py (submitit parameters, sbatch previews, job
liveness), warm.py and warm_zygote.py (local jobs forked from a process with torch and MLflow imported),
trial.py (trial.json identity + the job), runs.py (the study's MLflow runs), runner.py (the driver),
lifecycle.py and outcomes.py (what happens to a job and its trial), status.py (status table, dry run),
cli.py (`mgbench study ...`).
"""
