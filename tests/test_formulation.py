"""The two formulations against closed forms written out here: the flow path, DDPM's alpha-bar and posterior,
the SNR map of DDPM steps to flow time, the learned-variance bound, and the output split."""
import math

import pytest
import torch

from mgbench.config import ObjectiveConfig
from mgbench.trainer.formulation import DDPM, Flow, formulation_for, formulation_named, split_output

torch.set_num_threads(1)


def abar_by_hand(T):
    """alpha-bar of the linear-beta schedule, by plain float products (ADM's betas 1e-4 .. 0.02 scaled by 1000 / T)."""
    lo, hi = 1e-4 * 1000 / T, 0.02 * 1000 / T
    out, prod = [], 1.0
    for i in range(T):
        prod *= 1.0 - (lo + (hi - lo) * i / (T - 1))
        out.append(prod)
    return out


def first_step_with_abar_at_most(T, a):
    return next(s for s, ab in enumerate(abar_by_hand(T)) if ab <= a)


# ----------------------------------------------------------------------------- flow


def test_flow_is_the_linear_interpolant_with_velocity_target():
    f = Flow()
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 3, 2, 2, generator=gen), torch.randn(5, 3, 2, 2, generator=gen)
    t = torch.tensor([0.0, 0.25, 0.5, 0.9, 1.0])
    x_t = f.noise(x0, eps, t)
    for i, ti in enumerate(t.tolist()):
        torch.testing.assert_close(x_t[i], (1 - ti) * x0[i] + ti * eps[i], rtol=0, atol=1e-7)
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[-1], eps[-1])     # t = 0 data, t = 1 noise
    assert torch.equal(f.target(x0, eps), eps - x0)
    assert torch.equal(f.net_time(torch.tensor([0.25, 1.0])), torch.tensor([250.0, 1000.0]))
    assert torch.equal(f.flow_time(t), t)
    draw = f.sample_time(100_000, torch.Generator().manual_seed(1))
    assert draw.dtype == torch.float32 and 0 <= draw.min() and draw.max() < 1
    assert abs(draw.mean().item() - 0.5) < 4 * math.sqrt(1 / 12 / 100_000)
    assert f.default_sampler == "euler" and set(f.samplers) == {"euler", "heun", "euler_maruyama"}
    with pytest.raises(ValueError, match="needs formulation 'diffusion'"):
        f.variational_bound(x_t, t, eps, eps, eps)


# ----------------------------------------------------------------------------- DDPM tables


@pytest.mark.parametrize("T", [1000, 250])
def test_ddpm_alpha_bar_is_the_product_of_the_linear_betas(T):
    d = DDPM(T)
    assert d.betas[0].item() == pytest.approx(1e-4 * 1000 / T) and d.betas[-1].item() == pytest.approx(0.02 * 1000 / T)
    torch.testing.assert_close(d.abar, torch.tensor(abar_by_hand(T), dtype=torch.float64), rtol=1e-12, atol=0)
    if T == 1000:
        assert d.abar[-1].item() == pytest.approx(4.04e-5, rel=0.01)


def test_ddpm_noise_target_and_network_time():
    d = DDPM(1000)
    abar = abar_by_hand(1000)
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 2, 3, 3, generator=gen), torch.randn(4, 2, 3, 3, generator=gen)
    t = torch.tensor([0, 10, 500, 999])
    x_t = d.noise(x0, eps, t)
    assert x_t.dtype == torch.float32
    for i, ti in enumerate(t.tolist()):
        by_hand = math.sqrt(abar[ti]) * x0[i].double() + math.sqrt(1 - abar[ti]) * eps[i].double()
        torch.testing.assert_close(x_t[i].double(), by_hand, rtol=0, atol=1e-6)
    assert torch.equal(d.target(x0, eps), eps)
    assert torch.equal(d.net_time(t), torch.tensor([0.0, 10.0, 500.0, 999.0]))
    draw = d.sample_time(50_000, torch.Generator().manual_seed(2))
    assert draw.dtype == torch.long and draw.min() == 0 and draw.max() == 999
    assert d.default_sampler == "ddpm" and set(d.samplers) == {"ddpm", "ddim"}


def _gaussian_posterior(ab_prev, ab, x0, x_t):
    """q(x_prev | x_t, x0) by conditioning the joint Gaussian of (x_prev, x_t) given x0: (mean, variance).

    x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev) e1 and x_t = sqrt(a) x_prev + sqrt(1 - a) e2, a = ab / ab_prev.
    """
    a = ab / ab_prev
    cov = math.sqrt(a) * (1 - ab_prev)                                   # Cov(x_prev, x_t)
    mean = math.sqrt(ab_prev) * x0 + cov / (1 - ab) * (x_t - math.sqrt(ab) * x0)
    return mean, (1 - ab_prev) - cov ** 2 / (1 - ab)


def test_ddpm_posterior_is_the_conditioned_gaussian_for_the_full_and_a_respaced_chain():
    d = DDPM(1000)
    abar = abar_by_hand(1000)
    x0, x_t = 0.7, -1.3
    for chain in (d.posterior, d.chain(50), d.chain(40, "quadratic")):
        for i in (1, 2, len(chain.steps) // 2, len(chain.steps) - 1):
            s, t = chain.steps[i - 1], chain.steps[i]
            mean, var = _gaussian_posterior(abar[s], abar[t], x0, x_t)
            got = chain.coef_x0[i].item() * x0 + chain.coef_xt[i].item() * x_t
            assert got == pytest.approx(mean, rel=1e-9, abs=1e-12)
            assert math.exp(chain.log_var[i].item()) == pytest.approx(var, rel=1e-9)
        assert chain.log_var[0] == chain.log_var[1]                        # clipped: the first step has variance 0
        mean0, _ = _gaussian_posterior(1.0, abar[chain.steps[0]], x0, x_t)  # from the first step to the data: x0
        assert chain.coef_x0[0].item() * x0 + chain.coef_xt[0].item() * x_t == pytest.approx(mean0, abs=1e-12)
    assert d.chain(50).steps[:3] == [0, 20, 41] and len(d.chain(5000).steps) == 1000


# ----------------------------------------------------------------------------- DDPM step <-> flow time


@pytest.mark.parametrize("T", [1000, 250])
def test_snr_flow_time_has_the_ddpm_snr_and_round_trips_to_the_step(T):
    s = DDPM(T, "snr")
    steps = torch.arange(T)
    ft = s.flow_time(steps)
    abar = torch.tensor(abar_by_hand(T), dtype=torch.float64)
    torch.testing.assert_close(((1 - ft) / ft) ** 2, abar / (1 - abar), rtol=1e-9, atol=0)  # equal SNR
    assert (ft.diff() > 0).all() and 0 < ft[0] and ft[-1] < 1
    for t_map in ("snr", "linear"):
        sch = DDPM(T, t_map)
        assert torch.equal(sch.step_at(sch.flow_time(steps)), steps)  # step -> flow time -> step
        u = torch.rand(500, generator=torch.Generator().manual_seed(T), dtype=torch.float64)
        k = sch.step_at(u)  # the first step at or past u: flow_time(step) < u exactly for step < k
        assert torch.equal(sch.flow_time(steps)[None, :] < u[:, None], steps[None, :] < k[:, None])
    assert torch.equal(DDPM(T, "linear").flow_time(steps), steps.double() / T)


def test_snr_matched_numbers_of_the_1000_step_schedule():
    s = DDPM(1000)
    # Flow t = 0.75 has SNR (0.25 / 0.75)^2 = 1/9, i.e. abar = 0.1: the first DDPM step at or below it.
    step = first_step_with_abar_at_most(1000, 0.1)
    assert abs(step - 475) <= 2 and int(s.step_at(0.75)) == step
    a = abar_by_hand(1000)[750]
    closed = 1 / (1 + math.sqrt(a / (1 - a)))  # (1 - t) / t = sqrt(SNR)
    assert float(s.flow_time(torch.tensor(750))) == pytest.approx(closed, rel=1e-9)
    assert closed == pytest.approx(0.946, abs=5e-4)
    assert float(DDPM(1000, "linear").flow_time(torch.tensor(750))) == 0.75
    with pytest.raises(ValueError, match="unknown t_map 'sqrt'"):
        DDPM(10, "sqrt")


# ----------------------------------------------------------------------------- learned variance


def _tables_by_hand(T, t):
    """(abar, abar_prev, beta) at steps t, float64 columns, from the hand-written products."""
    ab = abar_by_hand(T)
    lo, hi = 1e-4 * 1000 / T, 0.02 * 1000 / T
    rows = [(ab[s], ab[s - 1] if s > 0 else 1.0, lo + (hi - lo) * s / (T - 1)) for s in t.tolist()]
    return (torch.tensor(col, dtype=torch.float64)[:, None] for col in zip(*rows))


def _kl_with_true_x0(x0, x_t, t, eps_pred, var_out):
    """The improved-DDPM KL term with the true posterior mean (from x0), written out (t > 0), in bits/dim."""
    ab, ab_prev, beta = _tables_by_hand(1000, t)
    post_var = beta * (1 - ab_prev) / (1 - ab)
    frac = (var_out.double() + 1) / 2
    model_log = frac * beta.log() + (1 - frac) * post_var.log()
    mean_true = (beta * ab_prev.sqrt() * x0.double() + (1 - ab_prev) * (1 - beta).sqrt() * x_t.double()) / (1 - ab)
    mean_pred = (x_t.double() - beta / (1 - ab).sqrt() * eps_pred.double()) / (1 - beta).sqrt()
    kl = 0.5 * (-1 + model_log - post_var.log() + (post_var.log() - model_log).exp()
                + (mean_true - mean_pred) ** 2 * (-model_log).exp())
    return kl.mean(1) / math.log(2.0)


def _noised(t, n=8, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(len(t), n, generator=gen), torch.randn(len(t), n, generator=gen)
    ab = next(iter(_tables_by_hand(1000, t)))
    return x0, eps, (ab.sqrt() * x0 + (1 - ab).sqrt() * eps).float(), gen


def test_learned_variance_bound_is_zero_at_the_true_posterior_and_positive_elsewhere():
    d = DDPM(1000)
    t = torch.tensor([1, 5, 50, 200, 400, 600, 800, 999])
    _, eps, x_t, _ = _noised(t)
    exact = d.variational_bound(x_t, t, eps, eps, -torch.ones_like(eps))  # true eps, variance = the posterior's
    assert exact.abs().max().item() < 1e-4
    off = d.variational_bound(x_t, t, eps, eps + 0.1, torch.ones_like(eps))
    assert (off > 1e-5).all() and off[0] > 0.1  # KL > 0 away from the posterior


def test_learned_variance_is_trained_to_the_posterior_variance_under_the_guided_target():
    d = DDPM(1000)
    t = torch.tensor([1, 20, 200, 475, 700, 999])
    x0, eps, x_t, gen = _noised(t, n=8)
    guided = eps + 0.3 * torch.randn(6, 8, generator=gen)  # eps + g (cond - uncond)
    var_new = (-torch.ones(6, 8)).requires_grad_()  # -1: the posterior log variance
    new = d.variational_bound(x_t, t, guided, guided, var_new)
    new.sum().backward()
    assert new.abs().max().item() < 1e-6 and var_new.grad.abs().max().item() == 0.0
    var_old = (-torch.ones(6, 8)).requires_grad_()
    _kl_with_true_x0(x0, x_t, t, guided, var_old).sum().backward()
    assert (var_old.grad < 0).all() and var_old.grad[0].sum() < -1e-2  # true x0: variance pulled up to absorb the offset
    # Unguided (target = the true eps): the value is the textbook one, for any prediction and variance.
    pred, var = eps + 0.2 * torch.randn(6, 8, generator=gen), torch.rand(6, 8, generator=gen) * 2 - 1
    torch.testing.assert_close(d.variational_bound(x_t, t, eps, pred, var).double(),
                               _kl_with_true_x0(x0, x_t, t, pred, var), rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- output split and lookup


def test_split_output_halves_the_channels_of_a_learned_variance():
    out = torch.arange(2 * 6 * 2.0).reshape(2, 6, 2)
    mean, var = split_output(out, True)
    assert torch.equal(mean, out[:, :3]) and torch.equal(var, out[:, 3:])
    same, none = split_output(out, False)
    assert same is out and none is None


def test_formulation_for_a_config():
    d = formulation_for(ObjectiveConfig(formulation="diffusion", diffusion_steps=250, t_map="linear"))
    assert isinstance(d, DDPM) and d.T == 250 and float(d.flow_time(torch.tensor(125))) == 0.5
    assert isinstance(formulation_for(ObjectiveConfig()), Flow)  # the default: SiT's flow
    with pytest.raises(ValueError, match=r"unknown formulation 'edm' \(flow \| diffusion\)"):
        formulation_named("edm")
