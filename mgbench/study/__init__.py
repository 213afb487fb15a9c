"""Studies: a YAML spec -> Optuna (ask/tell) -> submitit jobs -> MLflow runs; resumable, no idle slots.

spec.py (parse + validate), optuna_io.py (storages, samplers, pruners), executors.py (submitit
parameters, sbatch previews, job liveness), trial.py (trial.json identity + the job), runs.py (MLflow
runs), runner.py (the driver), status.py (status table, dry run), cli.py (`mgbench study ...`).
"""
