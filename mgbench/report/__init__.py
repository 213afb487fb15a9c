"""Reports: MLflow trial runs -> tidy DataFrame -> the paper's Tables 1-8 and Figures 2, 4, 5, 6."""
from mgbench.report.load import load_runs
from mgbench.report.render import write_table
from mgbench.report.tables import build_table, prepare_runs

__all__ = ["build_table", "load_runs", "prepare_runs", "write_table"]
