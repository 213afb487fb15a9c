"""`mgbench bench`: the paper's speed claims measured as ratios on this machine (and a GPU script)."""
from mgbench.bench.harness import bench_harness, bench_report_section, mlflow_cost, study_overhead
from mgbench.bench.models import bench_models
from mgbench.bench.sampling import bench_sampling
from mgbench.bench.timing import Check, Section, machine
from mgbench.bench.training import bench_training

__all__ = ["Check", "Section", "machine", "bench_sampling", "bench_training", "bench_models", "bench_harness",
           "bench_report_section", "mlflow_cost", "study_overhead"]
