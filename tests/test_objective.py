"""Exact math of the MG objective: targets, gradients, label dropout, w-input, empty-class removal."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from mgbench.config import ConfigError, ObjectiveConfig, TrainConfig, train_config_from_dict
from mgbench.trainer.models import build_model
from mgbench.trainer.objective import Objective, implied_cfg_scale, mg_target

torch.set_num_threads(1)
B, C = 64, 3
# alpha-bar of DDPM's 1000 linear betas 1e-4 .. 0.02 (the oracles below are written out, not taken from mgbench)
ABAR = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), dim=0)


def _models(w_input=False, empty_class=True, seed=0):
    torch.manual_seed(seed)
    kw = dict(input_shape=(2,), num_classes=C, empty_class=empty_class, w_input=w_input)
    model, teacher = build_model("MLP-S", **kw), build_model("MLP-S", **kw)
    for m in (model, teacher):  # leave the zero-initialised output layers: every branch must matter
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return model, teacher


def _batch(obj, w=1.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, 2, generator=gen)
    y = torch.randint(0, C, (B,), generator=gen)
    return x0, y, obj.draw(B, (2,), gen, w)


def _noisy(obj, x0, nz):
    """(x_t, plain target): DDPM sqrt(abar) x0 + sqrt(1 - abar) eps and eps; flow (1 - t) x0 + t eps and eps - x0."""
    if obj.cfg.formulation == "diffusion":
        a = ABAR[nz.t].reshape(-1, *([1] * (x0.dim() - 1)))
        return (a.sqrt() * x0 + (1 - a).sqrt() * nz.eps).float(), nz.eps
    t = nz.t.reshape(-1, *([1] * (x0.dim() - 1)))
    return (1 - t) * x0 + t * nz.eps, nz.eps - x0


def _t_net(formulation, t):
    """The network's time input: the DDPM step as a float, or 1000 t on the flow path."""
    return t.float() if formulation == "diffusion" else 1000 * t


def _empty_where(y, drop):
    """The labels with the dropped ones replaced by the empty class (index C)."""
    return torch.where(drop, C, y)


@pytest.mark.parametrize("formulation", ["flow", "diffusion"])
def test_mg_target_equals_eps_plus_g_times_cond_minus_uncond(formulation):
    cfg = ObjectiveConfig(formulation=formulation, w=1.5, t_high=1.0)
    obj = Objective(cfg, C)
    model, teacher = _models()
    x0, y, nz = _batch(obj)
    x_t, target = _noisy(obj, x0, nz)
    t_net = _t_net(formulation, nz.t)
    with torch.no_grad():
        cond = teacher(x_t, t_net, y)
        uncond = teacher(x_t, t_net, torch.full_like(y, C))
    expected = torch.where((nz.mg & ~nz.drop)[:, None], target + 0.5 * (cond - uncond), target)
    y_in = _empty_where(y, nz.drop)
    expected_loss = F.mse_loss(model(x_t, t_net, y_in), expected)
    loss, stats = obj.loss(model, teacher, x0, y, nz, mg_on=True)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    assert stats["mg_share"] == pytest.approx((nz.mg & ~nz.drop).float().mean().item())


def test_w_one_is_the_vanilla_loss_and_g_zero_leaves_the_target():
    target, cond, uncond = torch.randn(3, 5, 4).unbind(0)
    assert torch.equal(mg_target(target, cond, uncond, torch.zeros(5)), target)
    obj = Objective(ObjectiveConfig(w=1.0), C)
    model, teacher = _models()
    x0, y, nz = _batch(obj, w=1.0)
    x_t, target = _noisy(obj, x0, nz)
    t_net = _t_net("flow", nz.t)
    vanilla = F.mse_loss(model(x_t, t_net, _empty_where(y, nz.drop)), target)
    loss, stats = obj.loss(model, teacher, x0, y, nz, mg_on=True)
    assert torch.equal(loss, vanilla) and stats["mg_share"] == 0.0


def test_no_gradient_reaches_the_teacher_even_when_it_is_the_online_model():
    obj = Objective(ObjectiveConfig(w=2.0, t_high=1.0, mg_fraction=0.5), C)
    model, teacher = _models()
    x0, y, nz = _batch(obj, w=2.0)
    loss, _ = obj.loss(model, teacher, x0, y, nz, mg_on=True)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    # Online teacher (the model itself): the gradient equals that of the loss against a fixed target.
    model.zero_grad()
    loss, _ = obj.loss(model, model, x0, y, nz, mg_on=True)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    x_t, target = _noisy(obj, x0, nz)
    t_net = _t_net("flow", nz.t)
    with torch.no_grad():
        cond, uncond = model(x_t, t_net, y), model(x_t, t_net, torch.full_like(y, C))
    fixed = torch.where((nz.mg & ~nz.drop)[:, None], target + (cond - uncond), target)
    model.zero_grad()
    F.mse_loss(model(x_t, t_net, _empty_where(y, nz.drop)), fixed).backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)


def test_w_input_target_uses_the_w1_conditional_and_w0_unconditional_branches():
    cfg = ObjectiveConfig(w_range=[1.0, 3.0], t_high=1.0, force=True)
    obj = Objective(cfg, C, w_input=True)
    model, teacher = _models(w_input=True)
    x0, y, nz = _batch(obj)
    x_t, target = _noisy(obj, x0, nz)
    t_net = _t_net("flow", nz.t)
    ones, zeros = torch.ones(B), torch.zeros(B)
    with torch.no_grad():
        cond = teacher(x_t, t_net, y, ones)
        uncond = teacher(x_t, t_net, torch.full_like(y, C), zeros)
        wrong = teacher(x_t, t_net, y, nz.w)  # what a target fed the sampled w would use
    assert not torch.allclose(cond, wrong)
    guided = nz.mg & ~nz.drop
    expected = torch.where(guided[:, None], target + (nz.w - 1)[:, None] * (cond - uncond), target)
    w_fed = torch.where(nz.drop, zeros, nz.w)  # dropped samples train the w = 0 unconditional branch
    expected_loss = F.mse_loss(model(x_t, t_net, _empty_where(y, nz.drop), w_fed), expected)
    loss, _ = obj.loss(model, teacher, x0, y, nz, mg_on=True)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    assert nz.w.min() >= 1.0 and nz.w.max() <= 3.0 and nz.w.std() > 0.3


@pytest.mark.parametrize("n_labels", [0, 2])
def test_empty_class_removed_uses_the_mean_over_label_predictions(n_labels):
    cfg = ObjectiveConfig(w=1.5, t_high=1.0, empty_class=False, label_drop=0.0, uncond_labels=n_labels)
    obj = Objective(cfg, C)
    model, teacher = _models(empty_class=False)
    assert teacher.y_embedder.embedding_table.num_embeddings == C  # no empty row at all
    x0, y, nz = _batch(obj)
    assert not nz.drop.any()
    x_t, target = _noisy(obj, x0, nz)
    t_net = _t_net("flow", nz.t)
    with torch.no_grad():
        per_label = torch.stack([teacher(x_t, t_net, torch.full_like(y, c)) for c in range(C)])  # (C, B, 2)
        cond = teacher(x_t, t_net, y)
    if n_labels == 0:  # all C labels: the unconditional estimate is their mean
        expected = torch.where(nz.mg[:, None], target + 0.5 * (cond - per_label.mean(0)), target)
        loss, _ = obj.loss(model, teacher, x0, y, nz, mg_on=True)
        torch.testing.assert_close(loss, F.mse_loss(model(x_t, t_net, y), expected), rtol=1e-5, atol=1e-6)
        return
    # N random labels per guided sample: read each sample's target off the gradient of a zero output, and find
    # the uncond it implies among the means over every set of N distinct labels (no mgbench label drawing here).
    leaf, out, _ = _output_leaf(B)
    obj.loss(leaf, teacher, x0, y, nz, mg_on=True)[0].backward()
    got = -B * out.grad
    torch.testing.assert_close(got[~nz.mg], target[~nz.mg], rtol=1e-5, atol=1e-6)  # off the MG share: plain
    implied = cond - (got - target) / 0.5
    subsets = list(itertools.combinations(range(C), n_labels))
    means = torch.stack([per_label[list(s)].mean(0) for s in subsets])  # (subsets, B, 2)
    err = (means - implied[None]).abs().amax(-1)  # (subsets, B)
    best = err.argmin(0)
    assert nz.mg.any() and (err.min(0).values[nz.mg] < 1e-4).all()
    assert len(set(best[nz.mg].tolist())) > 1  # the sets are drawn per sample, not one set for the batch


def test_label_drop_rate_matches_lambda_and_dropped_labels_become_the_empty_class():
    n = 200_000
    y = torch.randint(0, C, (n,), generator=torch.Generator().manual_seed(2))
    for lam in (0.1, 0.3):
        obj = Objective(ObjectiveConfig(label_drop=lam), C)
        nz = obj.draw(n, (2,), torch.Generator().manual_seed(1), 1.0)
        model, _, calls = _output_leaf(n)
        obj.loss(model, None, torch.zeros(n, 2), y, nz, mg_on=False)
        (y_fed, _), = calls
        dropped = y_fed == C  # observed: the labels the model was fed
        sd = math.sqrt(lam * (1 - lam) / n)
        assert abs(dropped.float().mean().item() - lam) < 4 * sd
        assert torch.equal(y_fed[~dropped], y[~dropped]) and torch.equal(dropped, nz.drop)
    # Without an empty class there is nothing to drop to: every label reaches the model.
    obj = Objective(ObjectiveConfig(label_drop=0.3, empty_class=False), C)
    nz = obj.draw(n, (2,), torch.Generator().manual_seed(1), 1.0)
    model, _, calls = _output_leaf(n)
    obj.loss(model, None, torch.zeros(n, 2), y, nz, mg_on=False)
    assert torch.equal(calls[0][0], y)


def test_t_high_and_start_step_leave_the_plain_target():
    obj = Objective(ObjectiveConfig(w=1.5, t_high=0.5), C)
    model, teacher = _models()
    x0, y, nz = _batch(obj)
    _, stats = obj.loss(model, teacher, x0, y, nz, mg_on=True)
    assert stats["mg_share"] == pytest.approx((nz.mg & ~nz.drop & (nz.t < 0.5)).float().mean().item())
    assert 0 < stats["mg_share"] < 0.7
    _, stats = obj.loss(model, teacher, x0, y, nz, mg_on=False)
    assert stats["mg_share"] == 0.0
    # DDPM: t_high applies to the step's flow time, t / T (linear) or that of equal SNR (snr: flow t = 0.25 has
    # SNR (0.75 / 0.25)^2 = 9 = abar / (1 - abar), so MG stops at the first step with abar <= 0.9).
    for t_map, first_off in (("linear", 250), ("snr", int((ABAR > 0.9).sum()))):
        dobj = Objective(ObjectiveConfig(formulation="diffusion", w=1.5, t_high=0.25, t_map=t_map), C)
        x0, y, nz = _batch(dobj)
        _, stats = dobj.loss(model, teacher, x0, y, nz, mg_on=True)
        assert stats["mg_share"] == pytest.approx((nz.mg & ~nz.drop & (nz.t < first_off)).float().mean().item())


def test_implied_cfg_scale_and_the_fixed_point_guard():
    assert implied_cfg_scale(0.5) == pytest.approx(1.0)
    assert implied_cfg_scale(0.5, 0.5) == pytest.approx(1 / 3)
    assert implied_cfg_scale(1.0) == math.inf
    assert implied_cfg_scale(0.8, 1.0, w_input=True) == pytest.approx(0.8)
    assert implied_cfg_scale(0.5, 0.2222, w_input=True) == pytest.approx(0.5)  # fed w converges to s = w - 1
    assert implied_cfg_scale(1.5, 1.0, w_input=True) == pytest.approx(1.5)     # no feedback, no divergence
    with pytest.raises(ConfigError, match=r"cfg\.yaml:objective\.w: .*>= 1 has no fixed point"):
        train_config_from_dict({"objective": {"w": 2.0}}, "cfg.yaml")
    cfg = train_config_from_dict({"objective": {"w": 2.0, "mg_fraction": 0.5}}, "cfg.yaml")
    assert cfg.objective.mean_g == 1.0
    assert train_config_from_dict({"objective": {"w": 3.0, "force": True}}, "c").objective.force


def test_config_errors_name_file_and_field(tmp_path):
    from mgbench.config import load_train_config

    cases = {
        "objective:\n  label_drop: 1.0\n": r"c\.yaml:objective\.label_drop: 1\.0 is outside \[0\.0, 1\.0\)",
        "objective:\n  w: 0.5\n": r"c\.yaml:objective\.w: 0\.5 is outside",
        "objective:\n  wat: 1\n": r"c\.yaml:objective\.wat: unknown key \(allowed: ",
        "optim:\n  lr: fast\n": r"c\.yaml:optim\.lr: expected a number, got 'fast'",
        "data:\n  name: imagefolder\n  path: /nope\n  vae: /nope\n": r"c\.yaml:data\.path: folder '/nope' does not exist",
        "model:\n  arch: DiT-Q/3\n": r"c\.yaml:model\.arch: 'DiT-Q/3' is not one of MLP-S",
    }
    for text, pattern in cases.items():
        p = tmp_path / "c.yaml"
        p.write_text(text)
        with pytest.raises(ConfigError, match=pattern):
            load_train_config(p)
    assert isinstance(load_train_config(tmp_path / "c.yaml", {"model.arch": "MLP-B"}), TrainConfig)


def test_t_map_and_uncond_estimate_are_validated():
    with pytest.raises(ConfigError, match=r"c:objective\.t_map: 'sqrt' is not one of snr, linear"):
        train_config_from_dict({"objective": {"t_map": "sqrt"}}, "c")
    with pytest.raises(ConfigError, match=r"c:objective\.uncond_estimate: 'x' is not one of uniform, other_label"):
        train_config_from_dict({"objective": {"uncond_estimate": "x"}}, "c")
    assert train_config_from_dict({}, "c").objective.t_map == "snr"


# ----------------------------------------------------------------------------- w-input recipe


def _output_leaf(b, d=2):
    """A model whose output is a zero leaf: the target per sample is then -B * grad (mean over d = 2 dims)."""
    out = torch.zeros(b, d, requires_grad=True)
    calls = []

    def model(x, t, y, w=None):
        calls.append((y.clone(), None if w is None else w.clone()))
        return out
    return model, out, calls


def test_w_input_samples_off_the_mg_share_are_fed_w1_and_trained_on_the_plain_target():
    cfg = ObjectiveConfig(w_range=[1.5, 3.0], t_high=1.0, mg_fraction=0.5, label_drop=0.25)
    obj = Objective(cfg, C, w_input=True)
    b = 16
    gen = torch.Generator().manual_seed(3)
    x0, y = torch.randn(b, 2, generator=gen), torch.randint(0, C, (b,), generator=gen)
    nz = obj.draw(b, (2,), gen, 1.0)
    kinds = torch.where(nz.drop, 0, torch.where(nz.mg, 2, 1))  # 0 dropped, 1 off the MG share, 2 MG
    assert set(kinds.tolist()) == {0, 1, 2}

    def teacher(x, t, labels, w=None):  # cond (w = 1) = 2 (y + 1); uncond (empty, w = 0) = C + 1
        return ((labels.float() + 1) * (1 + w))[:, None].expand_as(x)
    model, out, calls = _output_leaf(b)
    loss, stats = obj.loss(model, teacher, x0, y, nz, mg_on=True)
    loss.backward()
    y_fed, w_fed = calls[0]
    assert torch.equal(w_fed, torch.where(kinds == 0, 0.0, torch.where(kinds == 1, 1.0, nz.w)))
    assert torch.equal(y_fed, torch.where(kinds == 0, C, y))
    plain = nz.eps - x0
    offset = ((nz.w - 1) * (2 * (y + 1) - (C + 1)))[:, None]
    expected = torch.where((kinds == 2)[:, None], plain + offset, plain)
    torch.testing.assert_close(-b * out.grad, expected, rtol=1e-6, atol=1e-6)
    assert stats["mg_share"] == (kinds == 2).float().mean().item()


# ----------------------------------------------------------------------------- learned variance


def test_loss_of_a_learned_variance_model_predicting_the_guided_target_is_zero():
    obj = Objective(ObjectiveConfig(formulation="diffusion", w=1.5, t_high=1.0, label_drop=0.25), C, learn_sigma=True)
    x0, y, nz = _batch(obj)
    nz.t = nz.t.clamp(min=1)  # t = 0 has the decoder NLL instead of a KL

    def teacher(x, t, labels, w=None):  # eps part: the label; variance part: anything
        return torch.cat([labels.float()[:, None].expand_as(x), torch.ones_like(x)], dim=1)
    guided = (nz.mg & ~nz.drop)[:, None]
    expected = torch.where(guided, nz.eps + 0.5 * (y - C).float()[:, None], nz.eps)
    assert guided.any()

    def model(x, t, labels, w=None):
        return torch.cat([expected, -torch.ones_like(x)], dim=1)
    loss, _ = obj.loss(model, teacher, x0, y, nz, mg_on=True)
    assert loss.item() < 1e-9


# ----------------------------------------------------------------------------- unconditional estimate


def test_other_label_estimate_never_picks_the_own_label_and_is_uniform_over_the_others():
    from mgbench.trainer.guidance import cond_and_uncond, draw_uncond_labels

    def label_value(x, t, labels, w=None):
        return labels.float()[:, None].expand_as(x)
    n, k = 60_000, 4
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, k, (n,), generator=gen)
    cond, uncond = cond_and_uncond(label_value, torch.zeros(n, 1), torch.zeros(n), y, num_classes=k,
                                   empty_class=False, generator=gen, uncond_estimate="other_label")
    other = uncond[:, 0].long()
    assert torch.equal(cond[:, 0].long(), y) and torch.equal(uncond[:, 0], other.float())
    assert not (other == y).any()
    for own in range(k):
        picked = other[y == own]
        p, m = 1 / (k - 1), len(picked)
        for c in set(range(k)) - {own}:
            assert abs((picked == c).sum().item() - m * p) < 4 * math.sqrt(m * p * (1 - p))
    sets = draw_uncond_labels(500, k, 2, torch.Generator().manual_seed(1), exclude=y[:500])
    assert not (sets == y[:500, None]).any() and (sets[:, 0] != sets[:, 1]).all()


def test_the_teacher_uses_one_other_label_with_uncond_estimate_other_label():
    cfg = ObjectiveConfig(w=1.5, t_high=1.0, empty_class=False, label_drop=0.0, uncond_estimate="other_label")
    obj = Objective(cfg, C)
    x0, y, nz = _batch(obj)

    def teacher(x, t, labels, w=None):
        return labels.float()[:, None].expand_as(x)
    model, out, _ = _output_leaf(B)
    obj.loss(model, teacher, x0, y, nz, mg_on=True)[0].backward()
    offset = (-B * out.grad - (nz.eps - x0))[:, 0] / 0.5  # = y - other on the MG share
    other = y - offset.round().long()
    assert torch.allclose(offset, offset.round(), atol=1e-4) and nz.mg.all()
    assert not (other == y).any() and ((other >= 0) & (other < C)).all()
    assert len(set(zip(y.tolist(), other.tolist()))) == C * (C - 1)  # every (own, other) pair occurs


# ----------------------------------------------------------------------------- EMA decay


def test_ema_decay_at_and_its_logged_value(tmp_path):
    from mgbench import tracking as T
    from mgbench.trainer.loop import train
    from mgbench.trainer.step import ema_decay_at, update_ema

    assert ema_decay_at(0.9999, 0, True) == 0.1
    assert ema_decay_at(0.9999, 1000, True) == 1001 / 1010 and round(1001 / 1010, 3) == 0.991
    assert ema_decay_at(0.9999, 8990, True) == 8991 / 9000 and round(8991 / 9000, 6) == 0.999
    assert ema_decay_at(0.9999, 10**6, True) == 0.9999 and ema_decay_at(0.9999, 0, False) == 0.9999
    ema, model = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        ema.weight.fill_(1.0), model.weight.fill_(0.0)
    update_ema(ema, model, 0.9999, 1000, True)
    assert ema.weight.item() == pytest.approx(1001 / 1010, rel=1e-6)
    cfg = train_config_from_dict({"out_dir": str(tmp_path / "r"), "data": {"name": "grid2d"},
                                  "model": {"arch": "MLP-S"}, "objective": {"w": 1.5},
                                  "optim": {"batch_size": 16, "ema_decay": 0.99},
                                  "train": {"steps": 10, "log_every": 5, "ckpt_every": 10},
                                  "sample": {"steps": 2, "n_grid": 4}}, "t")
    tr = T.MemoryTracker()
    train(cfg, tr)
    assert tr.metrics[T.M_EMA_DECAY] == [(5, 5 / 14), (10, 10 / 19)]  # steps 4 and 9 (0-based) were the last
