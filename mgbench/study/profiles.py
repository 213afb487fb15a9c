"""Site profiles: YAML files of submitit AutoExecutor parameters, validated by submitit itself (and by
mgbench.study.guards: option names a shell cannot misread, no control characters, no key given twice)."""
from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

from mgbench.config import ConfigError, parse_yaml
from mgbench.study.guards import check_option_keys, check_text

PROFILES_DIR = Path(__file__).resolve().parents[2] / "slurm" / "profiles"  # slurm/profiles/ in the repo


def profile_path(name_or_path: str | Path) -> Path:
    """Resolve a profile name (`local` -> slurm/profiles/local.yaml) or a path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    return PROFILES_DIR / f"{name_or_path}.yaml"


def _first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message (submitit's can be long)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[0] if lines else type(err).__name__


def _check(params: dict[str, Any], strict: bool) -> None:
    """Hand params to a real slurm AutoExecutor; submitit raises on unknown keys and bad values."""
    import submitit

    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        # strict: submitit's warnings (e.g. cpus_per_gpu without gpus_per_task) become errors
        warnings.simplefilter("error" if strict else "ignore")
        submitit.AutoExecutor(folder=folder, cluster="slurm").update_parameters(**params)


def validate_profile(params: dict[str, Any], where: str = "profile") -> None:
    """Raise ConfigError `where:key: ...` unless submitit accepts every key and the whole set."""
    check_option_keys(params, f"{where}:")  # names reach the sbatch script unquoted
    check_text(params, f"{where}:")         # a newline in a value ends its #SBATCH line: the rest runs as shell
    for key, value in params.items():
        if not isinstance(key, str):
            raise ConfigError(f"{where}:{key!r}: keys must be strings")
        try:
            _check({key: value}, strict=False)
        except Exception as err:  # NameError, ValueError, AssertionError, TypeError, UserWarning
            raise ConfigError(f"{where}:{key}: {_first_line(err)}") from err
    try:
        _check(params, strict=True)
    except Exception as err:
        raise ConfigError(f"{where}: {_first_line(err)}") from err


def load_profile(name_or_path: str | Path) -> dict[str, Any]:
    """Load and validate a site profile; returns kwargs for AutoExecutor.update_parameters."""
    path = profile_path(name_or_path)
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.yaml")))
        raise ConfigError(f"{path}: no such profile (known in {PROFILES_DIR}: {known})")
    data = parse_yaml(path.read_text(), path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of submitit parameters, got {type(data).__name__}")
    validate_profile(data, where=str(path))
    return data
