"""Exact math of the MG objective: targets, gradients, label dropout, w-input, empty-class removal."""
import math

import pytest
import torch
import torch.nn.functional as F

from mgbench.config import ConfigError, ObjectiveConfig, TrainConfig, train_config_from_dict
from mgbench.trainer.guidance import net_time
from mgbench.trainer.models import build_model
from mgbench.trainer.objective import Objective, drop_labels, implied_cfg_scale, mg_target
from mgbench.trainer.paths import DDPMSchedule, FlowPath

torch.set_num_threads(1)
B, C = 64, 3


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
    if obj.schedule is not None:
        return obj.schedule.add_noise(x0, nz.eps, nz.t), nz.eps
    return FlowPath.add_noise(x0, nz.eps, nz.t), FlowPath.target(x0, nz.eps)


@pytest.mark.parametrize("formulation", ["flow", "diffusion"])
def test_mg_target_equals_eps_plus_g_times_cond_minus_uncond(formulation):
    cfg = ObjectiveConfig(formulation=formulation, w=1.5, t_high=1.0)
    obj = Objective(cfg, C)
    model, teacher = _models()
    x0, y, nz = _batch(obj)
    x_t, target = _noisy(obj, x0, nz)
    t_net = net_time(formulation, nz.t)
    with torch.no_grad():
        cond = teacher(x_t, t_net, y)
        uncond = teacher(x_t, t_net, torch.full_like(y, C))
    expected = torch.where((nz.mg & ~nz.drop)[:, None], target + 0.5 * (cond - uncond), target)
    y_in = drop_labels(y, nz.drop, C)
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
    t_net = net_time("flow", nz.t)
    vanilla = F.mse_loss(model(x_t, t_net, drop_labels(y, nz.drop, C)), target)
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
    t_net = net_time("flow", nz.t)
    with torch.no_grad():
        cond, uncond = model(x_t, t_net, y), model(x_t, t_net, torch.full_like(y, C))
    fixed = torch.where((nz.mg & ~nz.drop)[:, None], target + (cond - uncond), target)
    model.zero_grad()
    F.mse_loss(model(x_t, t_net, drop_labels(y, nz.drop, C)), fixed).backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)


def test_w_input_target_uses_the_w1_conditional_and_w0_unconditional_branches():
    cfg = ObjectiveConfig(w_range=[1.0, 3.0], t_high=1.0, force=True)
    obj = Objective(cfg, C, w_input=True)
    model, teacher = _models(w_input=True)
    x0, y, nz = _batch(obj)
    x_t, target = _noisy(obj, x0, nz)
    t_net = net_time("flow", nz.t)
    ones, zeros = torch.ones(B), torch.zeros(B)
    with torch.no_grad():
        cond = teacher(x_t, t_net, y, ones)
        uncond = teacher(x_t, t_net, torch.full_like(y, C), zeros)
        wrong = teacher(x_t, t_net, y, nz.w)  # what a target fed the sampled w would use
    assert not torch.allclose(cond, wrong)
    guided = nz.mg & ~nz.drop
    expected = torch.where(guided[:, None], target + (nz.w - 1)[:, None] * (cond - uncond), target)
    w_fed = torch.where(nz.drop, zeros, nz.w)  # dropped samples train the w = 0 unconditional branch
    expected_loss = F.mse_loss(model(x_t, t_net, drop_labels(y, nz.drop, C), w_fed), expected)
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
    t_net = net_time("flow", nz.t)
    with torch.no_grad():
        per_label = torch.stack([teacher(x_t, t_net, torch.full_like(y, c)) for c in range(C)])  # (C, B, 2)
        cond = teacher(x_t, t_net, y)
    if n_labels == 0:
        uncond = per_label.mean(0)
    else:  # the same N labels the objective draws, from the batch's seed
        from mgbench.trainer.guidance import draw_uncond_labels
        idx = nz.mg.nonzero().squeeze(1)
        sets = draw_uncond_labels(len(idx), C, n_labels, torch.Generator().manual_seed(nz.uncond_gen_seed))
        uncond = per_label.mean(0).clone()
        uncond[idx] = torch.stack([per_label[sets[i], j].mean(0) for i, j in enumerate(idx.tolist())])
    expected = torch.where(nz.mg[:, None], target + 0.5 * (cond - uncond), target)
    loss, _ = obj.loss(model, teacher, x0, y, nz, mg_on=True)
    torch.testing.assert_close(loss, F.mse_loss(model(x_t, t_net, y), expected), rtol=1e-5, atol=1e-6)


def test_label_drop_rate_matches_lambda():
    for lam in (0.1, 0.3):
        obj = Objective(ObjectiveConfig(label_drop=lam), C)
        nz = obj.draw(200_000, (2,), torch.Generator().manual_seed(1), 1.0)
        sd = math.sqrt(lam * (1 - lam) / 200_000)
        assert abs(nz.drop.float().mean().item() - lam) < 4 * sd


def test_t_high_and_start_step_leave_the_plain_target():
    obj = Objective(ObjectiveConfig(w=1.5, t_high=0.5), C)
    model, teacher = _models()
    x0, y, nz = _batch(obj)
    _, stats = obj.loss(model, teacher, x0, y, nz, mg_on=True)
    assert stats["mg_share"] == pytest.approx((nz.mg & ~nz.drop & (nz.t < 0.5)).float().mean().item())
    assert 0 < stats["mg_share"] < 0.7
    _, stats = obj.loss(model, teacher, x0, y, nz, mg_on=False)
    assert stats["mg_share"] == 0.0
    # DDPM: t_high applies on the step index as flow time t / T.
    dobj = Objective(ObjectiveConfig(formulation="diffusion", w=1.5, t_high=0.25), C)
    x0, y, nz = _batch(dobj)
    _, stats = dobj.loss(model, teacher, x0, y, nz, mg_on=True)
    assert stats["mg_share"] == pytest.approx((nz.mg & ~nz.drop & (nz.t < 250)).float().mean().item())


def test_implied_cfg_scale_and_the_fixed_point_guard():
    assert implied_cfg_scale(0.5) == pytest.approx(1.0)
    assert implied_cfg_scale(0.5, 0.5) == pytest.approx(1 / 3)
    assert implied_cfg_scale(1.0) == math.inf
    assert implied_cfg_scale(0.8, 1.0, w_input=True) == pytest.approx(0.8)
    with pytest.raises(ConfigError, match=r"cfg\.yaml:objective\.w: .*>= 1 has no fixed point"):
        train_config_from_dict({"objective": {"w": 2.0}}, "cfg.yaml")
    cfg = train_config_from_dict({"objective": {"w": 2.0, "mg_fraction": 0.5}}, "cfg.yaml")
    assert cfg.objective.mean_g == 1.0
    assert train_config_from_dict({"objective": {"w": 3.0, "force": True}}, "c").objective.force


def test_ddpm_schedule_is_the_linear_one():
    s = DDPMSchedule(1000)
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    assert s.alphas_cumprod[-1].item() == pytest.approx(4.04e-5, rel=0.01)
    # Posterior mean of q(x_{t-1}|x_t, x0) with x_t built from x0 and eps is the DDPM closed form.
    t = torch.tensor([10, 500, 999])
    x0, eps = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    xt = s.add_noise(x0, eps, t)
    mean = s.at(s.posterior_coef_x0, t, x0) * x0 + s.at(s.posterior_coef_xt, t, x0) * xt
    a, ab = s.at(s.alphas, t, x0), s.at(s.alphas_cumprod, t, x0)
    ddpm = (xt - (1 - a) / (1 - ab).sqrt() * eps) / a.sqrt()
    torch.testing.assert_close(mean, ddpm)


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


def test_learned_variance_bound_is_zero_at_the_true_posterior_and_positive_elsewhere():
    obj = Objective(ObjectiveConfig(formulation="diffusion"), C, learn_sigma=True)
    s = obj.schedule
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(8, 4, 2, 2, generator=gen), torch.randn(8, 4, 2, 2, generator=gen)
    t = torch.tensor([1, 5, 50, 200, 400, 600, 800, 999])
    x_t = s.add_noise(x0, eps, t)
    exact = obj._vlb(x0, x_t, t, eps, -torch.ones_like(x0))  # true eps, variance = the posterior's
    assert exact.abs().max().item() < 1e-4
    off = obj._vlb(x0, x_t, t, eps + 0.1, torch.ones_like(x0))
    assert (off > 1e-5).all() and off[0] > 0.1  # KL > 0 away from the posterior
