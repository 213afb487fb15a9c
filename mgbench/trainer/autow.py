"""Automatic w: start at vanilla (w = 1) and move w only where paired guidance probes say it helps.

The paper describes automatic w without giving its rule; this one is ours. Comparing one evaluation
with the previous one cannot work: between two evaluations the metric moves mostly because training
went on (DiT on digits: FID 18 -> 9 -> 3 at steps 1k/2k/3k), so such a rule keeps raising w while
the quality gain comes from training, and one noisy uptick reverses it. Instead, each decision
compares guidance strengths on the SAME checkpoint with the SAME sample seeds, so training progress
and most sampling noise cancel:

1. Probes. At a decision the evaluation hook also measures the evaluated (EMA) checkpoint as if it
   had been trained at w' = w - d and w' = w + d (d = `auto_w.step`, w' clipped to [1, w_max]; a
   probe equal to w, or without a fixed point, is left out). A w-input model is simply fed w'. A
   fixed-w model gets CFG on top (`mg+cfg`) at the scale that turns its strength into that of w':
   at its fixed point a model trained with target weight g = w - 1 on a share f of the batch
   behaves like CFG s(w) = f g / (1 - f g) (`objective.implied_cfg_scale`), and CFG s' on top of a
   model of strength s gives (1 + s)(1 + s') - 1, so s' = (1 + s(w')) / (1 + s(w)) - 1
   = f (w' - w) / (1 - f (w' - 1)) (negative for w' < w; the sampler takes negative scales). If the
   run itself samples with CFG scale c on top, the probes use (1 + c)(1 + s') - 1. A model still
   short of its fixed point is weaker than s(w), so a probe shows slightly less than w': the
   direction of the decision stays right, its size errs small.
2. Paired gain. With K = `eval.sample_seeds` sample sets, seed k is the same sample set in the run's
   own evaluation and in each probe, so the gain of a probe is the mean over k of
   sign * (probe_k - own_k) (sign from `mgbench.metric_registry`: + if higher is better), and its
   standard error is that of the K paired differences. The best probe is the one of largest gain.
3. Move only on evidence. K >= 2: the best gain must exceed t * SE, t the one-sided Student-t
   quantile at level alpha / (number of probes) with K - 1 degrees of freedom (`auto_w.alpha`;
   Bonferroni, since the best of two is picked). Without a noise estimate (K = 1, or an SE of 0:
   a few seeds of a coarse metric can agree exactly) the gain must exceed `auto_w.min_gain` *
   |the run's own value| (default 2%). Not as a floor for K >= 2: early in training the value is
   large (FID 20), so a relative floor would block real guidance gains. Otherwise w stays.
4. Step. target = the best probe's w'; w <- decay * w + (1 - decay) * target (`auto_w.decay`).
5. Spacing. Decisions are at least `auto_w.min_gap` steps apart (0: the EMA teacher's time
   constant 1 / (1 - decay) at that step, so the model has moved towards its new fixed point before
   the next look; under `optim.ema_warmup` the decay is (1 + t) / (10 + t), so early decisions come
   often), none before `objective.start_step` (no MG yet) and none at the run's last step (the
   final evaluation is then of the w the run reports). Evaluations between decisions run no probes.

The state (w, the step of the last decision, every decision with its probes' values and gains) is a
plain dict, saved in every checkpoint; each decision is logged as `auto_w/<field>` next to `train/w`.
"""
from __future__ import annotations

import math
from typing import Any

from mgbench import tracking as T
from mgbench.config import AutoWConfig, TrainConfig
from mgbench.metric_registry import better_sign
from mgbench.trainer.objective import implied_cfg_scale

PROBES = ("lower", "higher")   # probe names: probe/lower/<metric> at w - d, probe/higher/<metric> at w + d


class AutoW:
    """Automatic w of one run: which probes to evaluate, and the decision once they are measured."""

    def __init__(self, cfg: AutoWConfig, *, fraction: float = 1.0, w_input: bool = False, start_step: int = 0,
                 end_step: int | None = None, base_cfg_scale: float = 0.0) -> None:
        self.cfg, self.fraction, self.w_input = cfg, fraction, w_input
        self.start_step, self.end_step, self.base_cfg_scale = start_step, end_step, base_cfg_scale
        self.sign = better_sign(cfg.metric)
        self.w = 1.0
        self.last_decision: int | None = None
        self.history: list[dict[str, Any]] = []

    @classmethod
    def for_run(cls, cfg: TrainConfig) -> "AutoW":
        """The automatic w of a trainer config (its MG share, model kind, warm-up, length and sampler)."""
        s = cfg.sample
        return cls(cfg.objective.auto_w, fraction=cfg.objective.mg_fraction, w_input=cfg.model.w_input,
                   start_step=cfg.objective.start_step, end_step=cfg.train.steps,
                   base_cfg_scale=s.cfg_scale if s.guidance in ("cfg", "mg+cfg") else 0.0)

    # ------------------------------------------------------------------ when and what to probe

    def gap(self, teacher_decay: float) -> int:
        """Minimum steps between decisions: `min_gap`, else the teacher's time constant 1 / (1 - decay)."""
        if self.cfg.min_gap:
            return self.cfg.min_gap
        return 10**9 if teacher_decay >= 1 else math.ceil(1 / (1 - teacher_decay) - 1e-9)

    def due(self, step: int, teacher_decay: float) -> bool:
        """Whether the evaluation at `step` is a decision (then it runs the probes)."""
        if step < self.start_step or (self.end_step is not None and step >= self.end_step):
            return False
        last = self.start_step if self.last_decision is None else self.last_decision
        return step - last >= self.gap(teacher_decay)

    def probe_ws(self) -> dict[str, float]:
        """The w of each probe at the current w (left out: equal to w, or without a fixed point)."""
        d, out = self.cfg.step, {}
        for name, w in zip(PROBES, (max(self.w - d, 1.0), min(self.w + d, self.cfg.w_max))):
            if abs(w - self.w) > 1e-12 and (self.w_input or self.fraction * (w - 1) < 1):
                out[name] = w
        return out

    def overrides(self, w_probe: float) -> dict[str, Any]:
        """Sampling overrides that make the evaluated checkpoint behave as if trained at `w_probe`."""
        if self.w_input:
            return {"w": w_probe}
        f = self.fraction
        s = (1 + implied_cfg_scale(w_probe - 1, f)) / (1 + implied_cfg_scale(self.w - 1, f)) - 1
        return {"guidance": "mg+cfg", "cfg_scale": (1 + self.base_cfg_scale) * (1 + s) - 1}

    def probes(self, step: int, teacher_decay: float) -> dict[str, dict[str, Any]]:
        """EvalContext.probes for the evaluation at `step`: name -> overrides; {} when no decision is due."""
        if not self.due(step, teacher_decay):
            return {}
        return {name: self.overrides(w) for name, w in self.probe_ws().items()}

    # ------------------------------------------------------------------ the decision

    def update(self, step: int, metrics: dict[str, float], teacher_decay: float) -> dict[str, float]:
        """Decide from an evaluation's metrics (with its probes); returns the decision's tracked metrics."""
        m = self.cfg.metric
        if not self.due(step, teacher_decay) or m not in metrics:
            return {}
        ws = self.probe_ws()
        if not ws:
            return {}
        probes = {name: paired_gain(metrics, m, T.metric_probe(name, m), self.sign) for name in ws}
        best = max(probes, key=lambda n: probes[n]["gain"] if math.isfinite(probes[n]["gain"]) else -math.inf)
        gain, se, k = probes[best]["gain"], probes[best]["se"], probes[best]["k"]
        threshold = self.threshold(se, k, len(probes), metrics[m])
        moved = math.isfinite(gain) and gain > threshold
        target = ws[best] if moved else self.w
        w_before = self.w
        self.w = min(max(self.cfg.decay * self.w + (1 - self.cfg.decay) * target, 1.0), self.cfg.w_max)
        self.last_decision = step
        for name, p in probes.items():
            p["w"] = ws[name]
        self.history.append({"step": step, "w": w_before, "w_after": self.w, "target": target, "moved": moved,
                             "value": metrics[m], "best": best, "threshold": threshold, "probes": probes})
        out = {"target": target, "gain": gain, "threshold": threshold, "moved": float(moved)}
        return {T.M_AUTO_W.format(key): float(v) for key, v in out.items()}

    def threshold(self, se: float, k: int, n_probes: int, own: float) -> float:
        """The gain the best probe must exceed: t * SE (K >= 2), else (or at SE 0) min_gain * |own value|."""
        if k < 2 or se == 0:
            return self.cfg.min_gain * abs(own)
        from scipy.stats import t as student_t

        return float(student_t.ppf(1 - self.cfg.alpha / n_probes, k - 1)) * se

    # ------------------------------------------------------------------ checkpointed state

    def state_dict(self) -> dict[str, Any]:
        return {"w": self.w, "last_decision": self.last_decision, "history": [dict(h) for h in self.history]}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.w, self.last_decision = float(d["w"]), d.get("last_decision")
        self.history = [dict(h) for h in d.get("history", []) if isinstance(h, dict)]


def paired_gain(metrics: dict[str, float], own: str, probe: str, sign: float) -> dict[str, float]:
    """Mean over sample seeds of sign * (probe_k - own_k), its SE (nan for K = 1) and K."""
    if probe not in metrics:
        raise KeyError(f"auto-w: the evaluation has no {probe!r}: the evaluation hook must measure "
                       "EvalContext.probes (mgbench.evaluation.make_eval_hook does)")
    k = 0
    while T.metric_seed(own, k) in metrics and T.metric_seed(probe, k) in metrics:
        k += 1
    if k < 2:
        return {"gain": sign * (metrics[probe] - metrics[own]), "se": math.nan, "k": 1}
    diffs = [sign * (metrics[T.metric_seed(probe, i)] - metrics[T.metric_seed(own, i)]) for i in range(k)]
    mean = sum(diffs) / k
    var = sum((x - mean) ** 2 for x in diffs) / (k - 1)
    return {"gain": mean, "se": math.sqrt(var / k), "k": k}
