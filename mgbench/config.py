"""Typed configs for the trainer, parsed once from YAML with errors that name file and field."""
from __future__ import annotations

import dataclasses
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad config value; the message is one line: `file:field: what is wrong (what is allowed)`."""


def print_error(prog: str, error: BaseException | str) -> int:
    """Print `PROG: error: MESSAGE` (its first line) on stderr; returns 2, the exit status of usage errors."""
    text = error.args[0] if isinstance(error, (LookupError, ValueError)) and error.args else error
    lines = str(text).strip().splitlines() or [type(error).__name__]
    print(f"{prog}: error: {lines[0]}", file=sys.stderr)
    return 2


# ----------------------------------------------------------------------------- sections


@dataclass
class DataConfig:
    name: str = "grid2d"           # grid2d | digits | mnist | imagefolder
    path: str | None = None        # imagefolder: root with one sub-folder per class (ImageNet layout)
    image_size: int = 256          # imagefolder: centre-crop size fed to the VAE
    vae: str | None = None         # imagefolder: local folder of a diffusers AutoencoderKL
    vae_scale: float = 0.18215     # imagefolder: latent scale (SD-VAE)
    cache_dir: str | None = None   # imagefolder: latent shards (default: <out_dir>/../latents)
    grid_cells: int = 4            # grid2d: cells per side of the two-class checkerboard
    train_fraction: float = 0.9    # digits/mnist: share of images used for training (the rest held out)

    def validate(self, where: str) -> None:
        _choice(where, "name", self.name, ("grid2d", "digits", "mnist", "imagefolder"))
        if self.name == "imagefolder":
            if not self.path:
                raise ConfigError(f"{where}.path: required for imagefolder (a folder with one sub-folder per class)")
            if not Path(self.path).is_dir():
                raise ConfigError(f"{where}.path: folder {self.path!r} does not exist")
            if not self.vae:
                raise ConfigError(f"{where}.vae: required for imagefolder (a local diffusers AutoencoderKL folder)")
            if not Path(self.vae).is_dir():
                raise ConfigError(f"{where}.vae: folder {self.vae!r} does not exist "
                                  "(a local diffusers AutoencoderKL folder)")
        _range(where, "grid_cells", self.grid_cells, 2, 64)
        _range(where, "train_fraction", self.train_fraction, 0.1, 1.0)


@dataclass
class ModelConfig:
    arch: str = "MLP-S"            # a registry name: MLP-S/B, DiT-T/2 ... DiT-XL/8 (see mgbench.archs.MODELS)
    learn_sigma: bool = False      # DiT on diffusion: also predict the variance (output 2C channels)
    w_input: bool = False          # scale-aware model: w is a network input (an extra scalar embedding)

    def validate(self, where: str) -> None:
        from mgbench.archs import MODELS

        _choice(where, "arch", self.arch, tuple(MODELS))


@dataclass
class AutoWConfig:
    # The rule is in mgbench/trainer/autow.py: each decision probes w - step and w + step on the evaluated checkpoint.
    enabled: bool = False          # adjust w from intermediate evaluations (starts at vanilla, w = 1)
    metric: str = "fid"            # evaluation metric that drives w (a mgbench.metric_registry name; it gives the direction)
    step: float = 0.1              # probe offset d: each decision also evaluates w - d and w + d (clipped to [1, w_max])
    decay: float = 0.5             # w <- decay * w + (1 - decay) * target w (the better probe's w)
    w_max: float = 3.0             # upper bound of w
    alpha: float = 0.05            # K >= 2 sample seeds: move only if the paired gain is significant (one-sided t, Bonferroni)
    min_gain: float = 0.02         # K = 1 (or SE 0): move only if the paired gain exceeds this share of |the run's value|
    min_gap: int = 0               # min steps between decisions (0: the EMA teacher's time constant 1 / (1 - decay) then)

    def validate(self, where: str) -> None:
        from mgbench.metric_registry import METRICS

        _choice(where, "metric", self.metric, tuple(k for k, v in METRICS.items() if v.family != "speed"))
        _range(where, "step", self.step, 0.0, 10.0, low_open=True)
        _range(where, "decay", self.decay, 0.0, 1.0, high_open=True)
        _range(where, "w_max", self.w_max, 1.0, 100.0)
        _range(where, "alpha", self.alpha, 0.0, 0.5, low_open=True)
        _range(where, "min_gain", self.min_gain, 0.0, 10.0)
        _range(where, "min_gap", self.min_gap, 0, 10**9)


@dataclass
class ObjectiveConfig:
    formulation: str = "flow"      # flow (SiT velocity, x_t = (1-t) x0 + t eps) | diffusion (DiT, DDPM eps)
    label_drop: float = 0.1        # lambda: share of labels dropped to the empty class (plain target); none without one
    w: float = 1.0                 # the paper's w: 1 = vanilla; the target weight is g = w - 1
    w_range: list[float] | None = None  # [lo, hi]: sample w per sample instead of the fixed w
    teacher: str = "ema"           # ema | online: which weights give sg(pred(c) - pred(empty))
    t_high: float = 0.75           # MG term only where t < t_high (flow time; DDPM steps mapped by t_map)
    t_map: str = "snr"             # DDPM step -> flow time: snr (equal SNR; 0.75 = step ~475/1000) | linear (step / T)
    start_step: int = 0            # plain training before this step, MG after
    # w-input models are fed w = 0 on dropped samples, w = 1 (plain target) on labelled ones off the MG
    # share, their sampled w on the MG share: the authors' 70% w = 1 / 20% MG / 10% dropped is
    # label_drop: 0.1, mg_fraction: 0.2222 (0.2 / 0.9).
    mg_fraction: float = 1.0       # share of the labelled samples on the MG target (the rest: plain target)
    empty_class: bool = True       # False: no empty label; unconditional estimated from labels (uncond_estimate)
    # Without an empty class, uniform is the mean over labels, the sample's own included (paper Eq. 23);
    # other_label contrasts with one random label other than the sample's own (the authors' code).
    uncond_estimate: str = "uniform"  # uniform | other_label (teacher only; sampling uses uniform)
    uncond_labels: int = 0         # uniform: N labels in that mean (0 = all classes, else N distinct random ones)
    # teacher without an empty class: label predictions per forward, memory (1 + chunk) x batch (0 = all N at once).
    # 4: N = 10 on CPU (2 threads, batch 64 DiT-T/2 | 16 DiT-S/2) costs 4.46x | 3.63x a vanilla step against 5.49x |
    # 3.91x at 16 (FLOP bound 4.67): one huge forward falls out of cache.
    uncond_chunk: int = 4
    force: bool = False            # allow f*g >= 1 (no fixed point: training diverges)
    diffusion_steps: int = 1000    # DDPM T (linear betas 1e-4 .. 0.02)
    auto_w: AutoWConfig = field(default_factory=AutoWConfig)

    @property
    def mg(self) -> bool:
        """Whether the MG term is ever applied."""
        return self.auto_w.enabled or self.w != 1.0 or self.w_range is not None

    def validate(self, where: str) -> None:
        _choice(where, "formulation", self.formulation, ("flow", "diffusion"))
        _choice(where, "teacher", self.teacher, ("ema", "online"))
        _choice(where, "t_map", self.t_map, ("snr", "linear"))
        _choice(where, "uncond_estimate", self.uncond_estimate, ("uniform", "other_label"))
        _range(where, "label_drop", self.label_drop, 0.0, 1.0, high_open=True)
        _range(where, "w", self.w, 1.0, 100.0)
        if self.w_range is not None:
            if len(self.w_range) != 2 or not 1.0 <= self.w_range[0] <= self.w_range[1]:
                raise ConfigError(f"{where}.w_range: expected [lo, hi] with 1 <= lo <= hi, got {self.w_range}")
        _range(where, "t_high", self.t_high, 0.0, 1.0, low_open=True)
        _range(where, "start_step", self.start_step, 0, 10**9)
        _range(where, "mg_fraction", self.mg_fraction, 0.0, 1.0)
        _range(where, "uncond_labels", self.uncond_labels, 0, 10**6)
        _range(where, "uncond_chunk", self.uncond_chunk, 0, 10**6)
        _range(where, "diffusion_steps", self.diffusion_steps, 2, 100000)
        if self.mg and self.label_drop == 0 and self.empty_class:
            raise ConfigError(f"{where}.label_drop: MG with an empty class needs label_drop > 0 "
                              "(else the empty class is never trained); or set empty_class: false")
        self.auto_w.validate(f"{where}.auto_w")
        fg = self.mg_fraction * self.mean_g
        if fg >= 1 and not self.force:
            raise ConfigError(f"{where}.w: mg_fraction * (w - 1) = {fg:.3g} >= 1 has no fixed point and diverges; "
                              "lower w or mg_fraction, or set force: true")

    @property
    def mean_g(self) -> float:
        """The mean target weight g = w - 1 over the w distribution."""
        if self.w_range is not None:
            return (self.w_range[0] + self.w_range[1]) / 2 - 1
        return self.w - 1


@dataclass
class OptimConfig:
    lr: float = 1e-4               # AdamW learning rate
    weight_decay: float = 0.0      # AdamW weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    batch_size: int = 256          # global batch (split over DDP ranks)
    ema_decay: float = 0.9999      # EMA of the weights (the MG teacher and the sampling model)
    ema_warmup: bool = True        # decay_t = min(ema_decay, (1 + step) / (10 + step)), so short runs get a live EMA
    grad_clip: float = 0.0         # clip the gradient norm (0 = off)

    def validate(self, where: str) -> None:
        _range(where, "lr", self.lr, 0.0, 1.0, low_open=True)
        _range(where, "batch_size", self.batch_size, 1, 10**7)
        _range(where, "ema_decay", self.ema_decay, 0.0, 1.0)


@dataclass
class SampleConfig:
    sampler: str = "auto"          # auto (ddpm for diffusion, euler for flow) | ddpm | ddim (diffusion, deterministic, eta 0) | euler | heun | euler_maruyama
    steps: int = 50                # sampling steps (DDPM: respaced to this many)
    spacing: str = "linear"        # ddpm/ddim respacing: linear (evenly spaced) | quadratic (finer low-noise steps)
    guidance: str = "auto"         # auto (mg for MG models, none otherwise) | none | cfg | mg | mg+cfg
    cfg_scale: float = 0.0         # CFG s: pred = cond + s * (cond - uncond); s = 0 is the conditional model
    w: float | None = None         # w-input models: the w fed at sampling (default: the trained w)
    n_grid: int = 64               # samples in the logged grid image
    seed: int = 0                  # sample i uses seed + i
    compile: bool | str = "auto"   # torch.compile the EMA model that samples (evaluation, grid): auto (on iff CUDA) | true | false

    def validate(self, where: str) -> None:
        _choice(where, "sampler", self.sampler, ("auto", "ddpm", "ddim", "euler", "heun", "euler_maruyama"))
        _choice(where, "guidance", self.guidance, ("auto", "none", "cfg", "mg", "mg+cfg"))
        _choice(where, "spacing", self.spacing, ("linear", "quadratic"))
        _range(where, "steps", self.steps, 1, 100000)
        _range(where, "cfg_scale", self.cfg_scale, 0.0, 100.0)
        _compile_choice(where, self.compile)


@dataclass
class EvalConfig:
    metrics: list[str] = field(default_factory=lambda: ["fid"])  # fid, sfid, is, kid, prc (= precision, recall), img_per_s; grid2d always gets its family (mgbench/metric_registry.py)
    n_samples: int = 1000          # generated samples per evaluation and sample seed (class-balanced, seed per sample)
    sample_seeds: int = 1          # K: each evaluation draws K disjoint sample sets and logs mean, SE and each value
    extractor: str = "auto"        # auto (digits/mnist: mgbench's classifier; imagefolder: inception) | classifier | inception | a registered name
    inception_weights: str | None = None  # local file pt_inception-2015-12-05-6726825d.pth (never downloaded)
    reference: str | None = None   # ADM reference batch .npz (ImageNet); default: statistics of the training split
    n_reference: int = 0           # training images in the reference statistics (0 = the whole split, at most 50,000)
    cache_dir: str = "~/.cache/mgbench"  # reference statistics and extractor weights
    batch_size: int = 256          # sampling batch for evaluation (also the IMG/S batch)
    gather_chunk: int = 1024       # multi-rank evaluation: samples moved to rank 0 per gather round (bounds its memory)
    cfg_sweep: list[float] = field(default_factory=list)  # extra evaluations at these CFG scales (Fig. 4)
    w_sweep: list[float] = field(default_factory=list)    # w-input models: extra evaluations fed these w (matched strength)
    sweep_final_only: bool = False  # run cfg_sweep / w_sweep only at the final evaluation (they multiply its cost)
    coverage_k: int = 0            # grid2d coverage: a square counts with >= k samples (0 = a quarter of the uniform count)
    save: str = "none"             # keep generated images under <out_dir>/eval/step_N/: none | npz (ADM arr_0) | png | both

    def validate(self, where: str) -> None:
        _range(where, "n_samples", self.n_samples, 2, 10**7)
        _range(where, "sample_seeds", self.sample_seeds, 1, 1000)
        for i, w in enumerate(self.w_sweep):
            _range(where, f"w_sweep[{i}]", w, 1.0, 100.0)
        _range(where, "batch_size", self.batch_size, 1, 10**6)
        _range(where, "gather_chunk", self.gather_chunk, 1, 10**7)
        _range(where, "n_reference", self.n_reference, 0, 10**8)
        _range(where, "coverage_k", self.coverage_k, 0, 10**9)
        _choice(where, "save", self.save, ("none", "npz", "png", "both"))
        from mgbench.metric_registry import METRICS   # the one metric list (prc = precision + recall)

        allowed = ("prc", *METRICS)
        for i, m in enumerate(self.metrics):
            _choice(where, f"metrics[{i}]", m, allowed)


@dataclass
class LoopConfig:
    steps: int = 2000              # total optimisation steps
    seed: int = 0                  # global seed (data order, noise, init)
    log_every: int = 50            # step metrics to the tracker every this many steps
    ckpt_every: int = 500          # checkpoint every this many steps (and at the end)
    keep_ckpts: int = 2            # checkpoints kept on disk (latest ones)
    max_steps_per_run: int = 0     # stop after this many steps in one invocation (0 = no cap); rerun resumes
    eval_every: int = 0            # call the evaluation hook every this many steps (0 = only at the end)
    precision: str = "fp32"        # fp32 | bf16 (autocast on GPU)
    tf32: bool = True              # allow TF32 matmuls on GPU
    device: str = "auto"           # auto | cpu | cuda
    compile: bool | str = "auto"   # torch.compile the model and its EMA teacher, fuse AdamW: auto (on iff CUDA) | true | false

    def validate(self, where: str) -> None:
        _compile_choice(where, self.compile)
        _range(where, "steps", self.steps, 1, 10**9)
        _range(where, "log_every", self.log_every, 1, 10**9)
        _range(where, "ckpt_every", self.ckpt_every, 1, 10**9)
        _range(where, "keep_ckpts", self.keep_ckpts, 1, 1000)
        _range(where, "max_steps_per_run", self.max_steps_per_run, 0, 10**9)
        _range(where, "eval_every", self.eval_every, 0, 10**9)
        _choice(where, "precision", self.precision, ("fp32", "bf16"))
        _choice(where, "device", self.device, ("auto", "cpu", "cuda"))


@dataclass
class TrainConfig:
    name: str = "run"              # a name for the run (folder name under out_dir)
    out_dir: str = "runs/run"      # checkpoints, samples and the resolved config go here
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self, where: str = "config") -> "TrainConfig":
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section):
                section.validate(f"{where}:{f.name}")
        if self.model.learn_sigma and self.objective.formulation != "diffusion":
            raise ConfigError(f"{where}:model.learn_sigma: only for formulation 'diffusion'")
        if self.model.arch.startswith("MLP") and self.data.name != "grid2d":
            raise ConfigError(f"{where}:model.arch: MLP models are for grid2d; use a DiT-* model for images")
        if self.data.name == "grid2d" and not self.model.arch.startswith("MLP"):
            raise ConfigError(f"{where}:model.arch: grid2d needs an MLP-* model")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- parsing


def from_dict(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a plain dict; unknown keys and wrong types are errors naming `where.key`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where.rstrip(':')}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{_join(where, unknown[0])}: unknown key (allowed: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(hints[k], v, _join(where, k)) for k, v in data.items()}
    return cls(**kwargs)


def _join(where: str, key: str) -> str:
    return f"{where}{key}" if where.endswith(":") else f"{where}.{key}"


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        if any(a in (bool, str) and type(value) is a for a in args):
            return value  # bool | str keeps either (`compile: true` or `compile: auto`)
        return _coerce(args[0], value, where)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


class DuplicateKeyError(yaml.YAMLError):
    """A mapping that names one key twice (YAML would silently keep the last value)."""

    def __init__(self, key: str, line: int, first: int) -> None:
        super().__init__(f"{key}: duplicate key (first at line {first})")
        self.key, self.line, self.first = key, line, first


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, but a key given twice in one mapping is a DuplicateKeyError naming line and dotted key."""

    def construct_document(self, node: yaml.Node) -> Any:
        self._checked: set[int] = set()
        self._check_unique(node, "")
        return super().construct_document(node)

    def _check_unique(self, node: yaml.Node, where: str) -> None:
        if id(node) in self._checked:
            return  # an alias of a node already checked (anchors may even refer to themselves)
        self._checked.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._check_unique(item, f"{where}[{i}]")
        if not isinstance(node, yaml.MappingNode):
            return
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` merges are overridden on purpose
            key = self.construct_object(key_node, deep=True) if isinstance(key_node, yaml.ScalarNode) else None
            dotted = f"{where}.{key}" if where else str(key)
            line = key_node.start_mark.line + 1
            if key is not None and key in seen:
                raise DuplicateKeyError(dotted, line, seen[key])
            if key is not None:
                seen[key] = line
            self._check_unique(value_node, dotted)


def parse_yaml(text: str, path: str | Path) -> Any:
    """Parse YAML text with unique keys; bad YAML or a duplicate key is a one-line ConfigError naming `path`."""
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except DuplicateKeyError as e:
        raise ConfigError(f"{path}:{e.line}:{e.key}: duplicate key (first at line {e.first}; keep one)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{line}: invalid YAML ({getattr(e, 'problem', e)})") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file, bad YAML or a key given twice is a one-line ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    data = parse_yaml(path.read_text(), path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return expand_env(data, f"{path}:")


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env(value: Any, where: str) -> Any:
    """Replace `${VAR}` in every string (site paths: `path: ${MGBENCH_IMAGENET}/train`); unset is an error."""
    if isinstance(value, dict):
        return {k: expand_env(v, _join(where, str(k))) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            if m.group(1) not in os.environ:
                raise ConfigError(f"{where.rstrip(':')}: environment variable {m.group(1)} is not set "
                                  f"(export {m.group(1)}=... before running)")
            return os.environ[m.group(1)]
        return _ENV.sub(sub, value)
    return value


def train_config_from_dict(data: dict[str, Any], source: str = "config") -> TrainConfig:
    """Parse and validate a trainer config mapping; errors read `source:field: ...`."""
    return from_dict(TrainConfig, data, f"{source}:").validate(source)


def load_train_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Load a trainer config from YAML, apply dotted overrides (`objective.w: 1.5`), validate."""
    data = load_yaml(path)
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    return train_config_from_dict(data, str(path))


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict, creating the levels on the way."""
    *parents, last = key.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {p} is not a mapping")
    node[last] = value


def _choice(where: str, name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{where}.{name}: {value!r} is not one of {', '.join(map(str, allowed))}")


def _compile_choice(where: str, value: bool | str) -> None:
    if not (value == "auto" or type(value) is bool):
        raise ConfigError(f"{where}.compile: {value!r} is not one of auto, true, false")


def compile_enabled(value: bool | str, device: Any) -> bool:
    """Whether a `compile` knob is on for this device: auto means on iff the device is CUDA."""
    return value is True or (value == "auto" and getattr(device, "type", str(device)) == "cuda")


def _range(where: str, name: str, value: float, lo: float, hi: float,
           low_open: bool = False, high_open: bool = False) -> None:
    bad = value < lo or value > hi or (low_open and value == lo) or (high_open and value == hi)
    if bad:
        lb, hb = "(" if low_open else "[", ")" if high_open else "]"
        raise ConfigError(f"{where}.{name}: {value!r} is outside {lb}{lo}, {hi}{hb}")
