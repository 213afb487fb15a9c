"""Automatic w (trainer/autow.py): paired probes on one checkpoint against a synthetic quality function, and in a run.

The synthetic world: a checkpoint at training step `step` sampled with effective CFG strength s at sample
seed k scores  A (s - s_opt)^2 + B exp(-step / tau) + noise_k  (lower is better, FID-like): a known optimum
in guidance plus a training-progress term that falls between evaluations (B = 40, tau = 1500: 20 -> 10 -> 5
at steps 1k/2k/3k, like DiT on digits). noise_k has a part shared by every sampling of one evaluation at seed
k (the same sample seeds) and a small part of its own. A fixed-w model trained at w behaves like CFG
s(w) = f g / (1 - f g), g = w - 1; CFG c on top of it gives (1 + s)(1 + c) - 1; a w-input model fed w like w - 1.
"""
import math

import numpy as np
import pytest
import torch

from mgbench import tracking as T
from mgbench.config import AutoWConfig, ConfigError, train_config_from_dict
from mgbench.evaluation.hook import make_eval_hook
from mgbench.evaluation.hook import summarise
from mgbench.metric_registry import METRICS, higher_is_better
from mgbench.trainer.autow import AutoW
from mgbench.trainer.checkpoint import latest_checkpoint, load_checkpoint
from mgbench.trainer.loop import train

torch.set_num_threads(1)
A, B, TAU, K = 2.0, 40.0, 1500.0, 3
COMMON_SD, OWN_SD = 0.3, 0.02       # noise shared by one evaluation's samplings at seed k / of each sampling


def strength(w: float, f: float = 1.0) -> float:
    """CFG scale of a fixed-w model at its fixed point (written here, independently of the trainer)."""
    return f * (w - 1) / (1 - f * (w - 1))


class World:
    """A synthetic run: evaluate(step, w, probes) -> the metrics dict the evaluation hook would return."""

    def __init__(self, w_opt: float, *, f: float = 1.0, w_input: bool = False, metric: str = "fid",
                 seed: int = 0, k: int = K, own_sd: float = OWN_SD) -> None:
        self.f, self.w_input, self.metric, self.seed, self.k, self.own_sd = f, w_input, metric, seed, k, own_sd
        self.s_opt = w_opt - 1 if w_input else strength(w_opt, f)
        self.sign = 1.0 if higher_is_better(metric) else -1.0   # higher is better: the mirror image

    def value(self, step: int, s: float, k: int, salt: int) -> float:
        common = np.random.default_rng([self.seed, step, k]).normal(0, COMMON_SD)
        own = np.random.default_rng([self.seed, step, k, salt]).normal(0, self.own_sd)
        loss = A * (s - self.s_opt) ** 2 + B * math.exp(-step / TAU) + common + own
        return -loss if self.sign > 0 else loss

    def s_total(self, w: float, overrides: dict) -> float:
        """The effective strength of the checkpoint trained at w, sampled with these overrides."""
        if self.w_input:
            return overrides.get("w", w) - 1
        s = strength(w, self.f)
        if overrides.get("guidance") == "mg+cfg":
            return (1 + s) * (1 + overrides["cfg_scale"]) - 1
        return s

    def evaluate(self, step: int, w: float, probes: dict[str, dict]) -> dict[str, float]:
        def measured(overrides: dict, salt: int) -> dict[str, float]:
            s = self.s_total(w, overrides)
            return summarise([{self.metric: self.value(step, s, k, salt)} for k in range(self.k)])

        out = measured({}, 0)
        for salt, (name, overrides) in enumerate(sorted(probes.items()), start=1):
            out.update({T.metric_probe(name, m): v for m, v in measured(overrides, salt).items()})
        return out


def previous_rule(world: World, cfg: AutoWConfig, steps: range) -> float:
    """The rule before this one, from its docstring: keep a direction (first: raise); reverse it when the
    metric got worse than at the previous evaluation; w <- decay w + (1 - decay) clip(w + direction * step)."""
    w, direction, last = 1.0, 1.0, None
    for step in steps:
        value = world.evaluate(step, w, {})[world.metric]
        if last is not None and world.sign * (value - last) < 0:
            direction = -direction
        w = cfg.decay * w + (1 - cfg.decay) * min(max(w + direction * cfg.step, 1.0), cfg.w_max)
        last = value
    return w


def run_autow(world: World, aw: AutoW, steps: range, teacher_decay: float = 0.99) -> AutoW:
    for step in steps:
        aw.update(step, world.evaluate(step, aw.w, aw.probes(step, teacher_decay)), teacher_decay)
    return aw


CFG = AutoWConfig(enabled=True, step=0.1, decay=0.5, w_max=1.9)
EVALS = range(250, 3001, 250)       # a 3000-step run evaluated every 250 steps


def test_paired_probes_find_the_optimum_where_the_previous_rule_climbs_with_training():
    """Same world, same config: the probes end within d of w_opt; comparing with the previous evaluation climbs."""
    w_opt, d = 1.25, CFG.step
    for seed in range(5):
        world = World(w_opt, seed=seed)
        aw = run_autow(world, AutoW(CFG, end_step=3000), EVALS)
        old = previous_rule(world, CFG, EVALS)
        assert abs(aw.w - w_opt) <= d, (seed, aw.w)
        assert old - w_opt >= 2 * d, (seed, old)        # 1.5-1.6: FID fell at every evaluation, from training
        assert len(aw.history) == 11 and aw.history[0]["best"] == "higher" and aw.history[0]["moved"]


def test_fixed_w_probes_sample_exactly_the_strength_of_the_probed_w():
    f, w, d = 0.5, 1.4, 0.3
    aw = AutoW(AutoWConfig(enabled=True, step=d, w_max=2.5), fraction=f)
    aw.w = w
    probes = aw.probes(1000, 0.99)
    assert set(probes) == {"lower", "higher"} and all(p["guidance"] == "mg+cfg" for p in probes.values())
    for name, w_probe in (("lower", w - d), ("higher", w + d)):
        total = (1 + strength(w, f)) * (1 + probes[name]["cfg_scale"]) - 1
        assert total == pytest.approx(strength(w_probe, f), abs=1e-12)
    assert probes["lower"]["cfg_scale"] < 0 < probes["higher"]["cfg_scale"]
    # The run samples with CFG c = 0.5 on top: the probes keep it, and add the probed strength.
    on_top = AutoW(AutoWConfig(enabled=True, step=d, w_max=2.5), fraction=f, base_cfg_scale=0.5)
    on_top.w = w
    scale = on_top.probes(1000, 0.99)["higher"]["cfg_scale"]
    assert (1 + strength(w, f)) * (1 + scale) == pytest.approx((1 + strength(w + d, f)) * 1.5)
    # Left out: below w = 1, above w_max (clipped instead when w is not at the bound), no fixed point.
    aw.w = 1.0
    assert set(aw.probes(1000, 0.99)) == {"higher"}
    edge = AutoW(AutoWConfig(enabled=True, step=0.2, w_max=3.0), fraction=1.0)
    edge.w = 1.9
    assert edge.probe_ws() == {"lower": pytest.approx(1.7)}       # w = 2.1: f g = 1.1, no fixed point


def test_noise_below_the_threshold_does_not_move_w():
    """Paired gains [0.3, -0.2, 0.25] (SE 0.159): t(0.975, 2 df) = 4.303 (two probes, alpha 0.05) -> stay."""
    cfg = AutoWConfig(enabled=True, metric="fid", step=0.2, decay=0.5, w_max=3.0, alpha=0.05)
    own = [10.0, 10.5, 9.8]

    def metrics(higher_minus_own, lower_minus_own=(1.0, 1.0, 1.0)):
        out = summarise([{"fid": v} for v in own])
        for name, delta in (("higher", higher_minus_own), ("lower", lower_minus_own)):
            probe = summarise([{"fid": v + e} for v, e in zip(own, delta)])
            out.update({T.metric_probe(name, m): v for m, v in probe.items()})
        return out

    aw = AutoW(cfg)
    aw.load_state_dict({"w": 1.5, "last_decision": 0, "history": []})
    aw.update(100, metrics([-0.3, 0.2, -0.25]), 0.9)
    h = aw.history[-1]
    assert aw.w == 1.5 and not h["moved"] and h["target"] == 1.5 and aw.last_decision == 100
    se = np.std([0.3, -0.2, 0.25], ddof=1) / math.sqrt(3)
    assert h["threshold"] == pytest.approx(4.302653 * se, rel=1e-5)
    assert h["probes"]["higher"]["gain"] == pytest.approx(0.35 / 3)
    # Consistent gains of the same size at every seed: significant, w moves half-way to w + d.
    aw.update(200, metrics([-0.3, -0.28, -0.32]), 0.9)
    assert aw.history[-1]["moved"] and aw.w == pytest.approx(1.6)
    # K = 1: no SE, so the gain must exceed min_gain (2%) of the run's value: 0.15 < 0.2 stays, 0.25 moves.
    one = AutoW(cfg)
    for step, gain, w_after in ((10, 0.15, 1.0), (20, 0.25, 1.1)):
        m = {"fid": 10.0, T.metric_probe("higher", "fid"): 10.0 - gain}
        one.update(step, m, 0.9)
        assert one.w == pytest.approx(w_after) and one.history[-1]["threshold"] == pytest.approx(0.2)
    # K = 2 seeds that agree exactly (SE 0, a coarse metric): no noise estimate either, the same 2% floor.
    exact = AutoW(cfg)
    m = summarise([{"fid": 10.0}, {"fid": 10.0}])
    m.update({T.metric_probe("higher", k): v for k, v in summarise([{"fid": 9.9}, {"fid": 9.9}]).items()})
    exact.update(10, m, 0.9)
    assert exact.w == 1.0 and exact.history[-1]["threshold"] == pytest.approx(0.2)


def test_decisions_are_spaced_by_the_teacher_time_constant_and_skip_warm_up_and_the_end():
    aw = AutoW(AutoWConfig(enabled=True, step=0.1), start_step=200, end_step=5000)
    assert aw.gap(0.999) == 1000 and aw.gap(0.99) == 100
    assert aw.probes(1100, 0.999) == {}                     # 900 steps after MG starts: not yet
    assert set(aw.probes(1200, 0.999)) == {"higher"}
    world = World(1.5)
    aw.update(1200, world.evaluate(1200, aw.w, aw.probes(1200, 0.999)), 0.999)
    assert aw.last_decision == 1200 and aw.probes(2000, 0.999) == {} and aw.probes(2200, 0.999) != {}
    assert aw.update(2000, world.evaluate(2000, aw.w, {}), 0.999) == {}   # not due: no decision
    assert aw.probes(5000, 0.9) == {}                       # the final evaluation is of the reported w
    fixed = AutoW(AutoWConfig(enabled=True, min_gap=300))
    assert fixed.gap(0.999) == 300 and fixed.probes(299, 0.5) == {} and fixed.probes(300, 0.5) != {}


def test_state_round_trips_and_a_resumed_autow_decides_as_an_uninterrupted_one():
    world = World(1.25, seed=3)
    full = run_autow(world, AutoW(CFG, end_step=3000), EVALS)
    first = run_autow(world, AutoW(CFG, end_step=3000), EVALS[:5])
    resumed = AutoW(CFG, end_step=3000)
    resumed.load_state_dict(torch.load(_saved(first.state_dict()), weights_only=False))
    assert resumed.state_dict() == first.state_dict()
    run_autow(world, resumed, EVALS[5:])
    assert resumed.w == full.w and resumed.history == full.history and resumed.last_decision == full.last_decision
    h = full.history[0]
    assert set(h) >= {"step", "w", "w_after", "target", "moved", "value", "best", "threshold", "probes"}
    assert set(h["probes"]["higher"]) == {"w", "gain", "se", "k"} and h["probes"]["higher"]["k"] == K


def _saved(state):
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf


def test_w_input_models_are_fed_the_probed_w():
    aw = AutoW(AutoWConfig(enabled=True, step=0.25, w_max=4.0), w_input=True)
    aw.w = 2.0
    assert aw.probes(100, 0.9) == {"lower": {"w": 1.75}, "higher": {"w": 2.25}}
    aw.w = 3.9                                               # no fixed-point limit for w-input models
    assert aw.probes(100, 0.9) == {"lower": {"w": pytest.approx(3.65)}, "higher": {"w": 4.0}}
    world = World(1.5, w_input=True)
    got = run_autow(world, AutoW(AutoWConfig(enabled=True, step=0.2, w_max=3.0), w_input=True, end_step=3000), EVALS)
    assert abs(got.w - 1.5) <= 0.2 and all(h["probes"]["higher"]["w"] == pytest.approx(h["w"] + 0.2) for h in got.history)


@pytest.mark.parametrize("start, w_opt", [(1.0, 1.25), (1.8, 1.25)])
def test_higher_is_better_metrics_move_w_towards_their_optimum(start, w_opt):
    assert higher_is_better("in_class") and not higher_is_better("fid")
    world = World(w_opt, metric="in_class")
    aw = AutoW(AutoWConfig(enabled=True, metric="in_class", step=0.1, decay=0.5, w_max=1.9), end_step=6000)
    aw.load_state_dict({"w": start, "last_decision": None, "history": []})
    run_autow(world, aw, range(250, 6001, 250))
    assert abs(aw.w - w_opt) <= 0.1 and (aw.w - start) * (w_opt - start) > 0


def test_metric_registry_and_config_checks():
    assert {"fid", "sfid", "is", "kid", "precision", "recall", "img_per_s", "in_class", "wrong_class", "off_board",
            "off_support", "coverage", "subcell_coverage", "swd", "center_dist"} == set(METRICS)
    assert [m for m in METRICS if METRICS[m].higher_is_better] == ["is", "precision", "recall", "img_per_s",
                                                                    "in_class", "coverage", "subcell_coverage"]
    for bad, match in (({"metric": "FID"}, r"auto_w\.metric: 'FID' is not one of fid, sfid"),
                       ({"metric": "img_per_s"}, r"auto_w\.metric: 'img_per_s' is not one of"),
                       ({"alpha": 0.0}, r"auto_w\.alpha: 0\.0 is outside \(0\.0, 0\.5\]"),
                       ({"min_gap": -1}, r"auto_w\.min_gap")):
        with pytest.raises(ConfigError, match=match):
            train_config_from_dict({"objective": {"auto_w": {"enabled": True, **bad}}}, "x.yaml").validate()


def tiny(out_dir, **auto):
    """A tiny MG run on grid2d with automatic w (a few seconds)."""
    return train_config_from_dict({
        "name": "tiny-autow", "out_dir": str(out_dir), "data": {"name": "grid2d"}, "model": {"arch": "MLP-S"},
        "objective": {"w": 1.0, "auto_w": {"enabled": True, "metric": "in_class", "step": 0.25, "w_max": 2.0, **auto}},
        "optim": {"lr": 1e-3, "batch_size": 64, "ema_decay": 0.99},
        "train": {"steps": 60, "eval_every": 20, "log_every": 10, "ckpt_every": 20},
        "sample": {"steps": 4, "n_grid": 16},
        "eval": {"n_samples": 64, "batch_size": 64, "sample_seeds": 2}}, "test")


def test_trainer_hands_probes_to_the_hook_and_resumes_the_state(tmp_path):
    """The trainer asks for probes, decides from the hook's answer, and a paused run continues the same way."""
    world = World(1.3, metric="in_class", k=2)
    seen = []

    def hook(ctx):
        seen.append((ctx.step, ctx.w, dict(ctx.probes)))
        return world.evaluate(ctx.step * 50, ctx.w, ctx.probes)

    full = train(tiny(tmp_path / "full"), eval_hook=hook)
    whole, seen[:] = list(seen), []
    cfg = tiny(tmp_path / "split")
    cfg.train.max_steps_per_run = 40
    assert train(cfg, eval_hook=hook).status == "paused"
    resumed = train(cfg, eval_hook=hook)
    assert seen == whole and resumed.w == full.w
    assert [s for s, _, p in whole if p] == [20, 40]          # decisions at 20 and 40; none at the last step
    state = load_checkpoint(latest_checkpoint(tmp_path / "split"))["auto_w"]
    assert state["w"] == full.w and [h["step"] for h in state["history"]] == [20, 40]


def test_grid2d_run_with_auto_w_evaluates_probes_and_checkpoints_its_state(tmp_path):
    """A real run: make_eval_hook samples the probes (CFG on top: 2 forwards per step), w stays in [1, w_max]."""
    cfg = tiny(tmp_path / "run")
    tracker = T.MemoryTracker()
    result = train(cfg, tracker, make_eval_hook(cfg))
    higher = T.metric_probe("higher", "in_class")
    assert [s for s, _ in tracker.metrics[higher]] == [20, 40]
    assert tracker.series(T.metric_probe("higher", "nfe")) == [8.0, 8.0]
    assert T.metric_seed(higher, 1) in tracker.metrics and T.metric_se(higher) in tracker.metrics
    assert [s for s, _ in tracker.metrics[T.M_AUTO_W.format("moved")]] == [20, 40]
    assert all(1.0 <= w <= 2.0 for w in tracker.series(T.M_W)) and 1.0 <= result.w <= 2.0
    state = load_checkpoint(latest_checkpoint(tmp_path / "run"))["auto_w"]
    assert state["w"] == result.w and state["last_decision"] == 40
    first = state["history"][0]
    assert first["w"] == 1.0 and first["value"] == tracker.metrics[T.metric_eval("in_class")][0][1]
    assert first["probes"]["higher"]["w"] == 1.25 and "lower" not in first["probes"]
