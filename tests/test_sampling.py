"""Samplers and the guidance helper against closed forms (exact eps / velocity of Gaussian data)."""
from __future__ import annotations

import math

import pytest
import torch

from mgbench.trainer.guidance import cfg_combine, cond_and_uncond, draw_uncond_labels, net_time, split_sigma
from mgbench.trainer.models import build_model
from mgbench.trainer.paths import DDPMSchedule
from mgbench.trainer.sampling import respaced_timesteps, sample

torch.set_num_threads(1)

MU = torch.tensor([1.5, -1.0], dtype=torch.float64)
SIGMA = torch.tensor([[1.0, 0.6], [0.6, 0.8]], dtype=torch.float64)


class GaussianOracle:
    """The exact eps (DDPM) or velocity (flow) of a mixture of Gaussians N(mu_k, Sigma), one per class.

    Label k < K is component k; label K (the empty class) is the mixture with equal weights,
    or the mean of the K class predictions when `empty="mean"`.
    """

    def __init__(self, formulation: str, mus: torch.Tensor, sigma: torch.Tensor, T: int = 1000,
                 empty: str = "mixture") -> None:
        self.formulation, self.mus, self.sigma, self.empty = formulation, mus.double(), sigma.double(), empty
        self.abar = DDPMSchedule(T).alphas_cumprod
        self.calls: list[tuple[int, torch.Tensor | None]] = []

    def _coeffs(self, t_net: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, s) with x_t = a x0 + s eps."""
        if self.formulation == "diffusion":
            abar = self.abar[t_net.long()]
            return abar.sqrt(), (1 - abar).sqrt()
        t = t_net.double() / 1000
        return 1 - t, t

    def _component(self, x: torch.Tensor, a: torch.Tensor, s: torch.Tensor, k: int):
        """(prediction, log density of x_t) under component k."""
        eye = torch.eye(2, dtype=torch.float64)
        cov = a[:, None, None] ** 2 * self.sigma + s[:, None, None] ** 2 * eye      # C_t
        r = x - a[:, None] * self.mus[k]
        sol = torch.linalg.solve(cov, r.unsqueeze(-1)).squeeze(-1)                  # C_t^-1 (x - m_t)
        logp = -0.5 * (r * sol).sum(-1) - 0.5 * torch.logdet(cov)
        if self.formulation == "diffusion":
            return s[:, None] * sol, logp                                           # E[eps | x_t]
        cross = s[:, None, None] * eye - a[:, None, None] * self.sigma             # Cov(eps - x0, x_t)
        return -self.mus[k] + (cross @ sol.unsqueeze(-1)).squeeze(-1), logp        # E[v | x_t]

    def __call__(self, x, t_net, y, w=None):
        self.calls.append((x.shape[0], None if w is None else w.clone()))
        xd = x.double()
        a, s = self._coeffs(t_net)
        comps = [self._component(xd, a, s, k) for k in range(len(self.mus))]
        preds = torch.stack([c[0] for c in comps])                                  # (K, B, 2)
        if self.empty == "mean":
            mix = preds.mean(0)
        else:
            resp = torch.softmax(torch.stack([c[1] for c in comps]), dim=0)         # P(k | x_t)
            mix = (resp.unsqueeze(-1) * preds).sum(0)
        k = len(self.mus)
        onehot = torch.nn.functional.one_hot(y.clamp(max=k - 1), k).T.double().unsqueeze(-1)
        out = torch.where((y == k)[:, None], mix, (onehot * preds).sum(0))
        return out.float()


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.double()
    return x.mean(0), torch.cov(x.T)


def _gauss_sample(formulation: str, sampler: str, steps: int, n: int = 3000, T: int = 1000, **kw):
    oracle = GaussianOracle(formulation, MU[None], SIGMA, T)
    return sample(oracle, formulation=formulation, shape=(2,), labels=torch.zeros(n, dtype=torch.long),
                  seeds=range(n), sampler=sampler, steps=steps, num_classes=1, diffusion_steps=T, **kw)


# ----------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("T,steps,n", [(1000, 1000, 2000), (1000, 250, 3000)])
def test_ddpm_recovers_gaussian(T, steps, n):
    """Full and respaced ancestral DDPM (fixed-small variance; with far fewer steps it loses variance)."""
    res = _gauss_sample("diffusion", "ddpm", steps, n=n, T=T)
    mean, cov = _stats(res.x)
    assert res.nfe == steps and res.steps == steps
    assert torch.allclose(mean, MU, atol=0.08), mean
    assert torch.allclose(cov, SIGMA, atol=0.1), cov


def test_respaced_timesteps_match_improved_ddpm():
    assert respaced_timesteps(1000, 1000) == list(range(1000))
    use = respaced_timesteps(1000, 250)
    assert len(use) == 250 and use[0] == 0 and use[-1] == 999 and use[1] == 4 and use[2] == 8
    assert respaced_timesteps(10, 4) == [0, 3, 6, 9]


def test_flow_ode_samplers_follow_the_exact_map():
    """For Gaussian data the flow ODE maps noise eps to mu + Sigma^(1/2) eps; Heun is second order."""
    evals, evecs = torch.linalg.eigh(SIGMA)
    root = evecs @ torch.diag(evals.sqrt()) @ evecs.T
    errors = {}
    for sampler, steps in [("euler", 20), ("euler", 40), ("heun", 10), ("heun", 20)]:
        res = _gauss_sample("flow", sampler, steps, n=200, return_trajectory=True)
        exact = MU + res.trajectory[0].double() @ root.T
        errors[sampler, steps] = (res.x.double() - exact).abs().max().item()
        assert len(res.trajectory) == steps + 1
    assert errors["heun", 20] < 1e-2 and errors["euler", 40] < 0.1
    assert 1.6 < errors["euler", 20] / errors["euler", 40] < 2.4          # first order
    assert 3.0 < errors["heun", 10] / errors["heun", 20] < 5.0            # second order


@pytest.mark.parametrize("sampler,steps", [("euler", 50), ("heun", 25), ("euler_maruyama", 100)])
def test_flow_samplers_recover_gaussian(sampler, steps):
    res = _gauss_sample("flow", sampler, steps)
    mean, cov = _stats(res.x)
    assert res.nfe == (2 * steps - 1 if sampler == "heun" else steps)
    assert torch.allclose(mean, MU, atol=0.08), mean
    assert torch.allclose(cov, SIGMA, atol=0.1), cov


def test_euler_maruyama_is_stochastic_and_ends_deterministic():
    ode = _gauss_sample("flow", "euler", 30, n=64).x
    sde = _gauss_sample("flow", "euler_maruyama", 30, n=64, return_trajectory=True)
    assert (ode - sde.x).abs().mean() > 0.05                                # different paths
    assert torch.equal(sde.x, _gauss_sample("flow", "euler_maruyama", 30, n=64).x)  # same seeds, same samples


# ----------------------------------------------------------------------------- guidance


MUS2 = torch.tensor([[-2.0, 0.0], [2.0, 0.0]], dtype=torch.float64)


def _mix_sample(formulation: str, guidance: str, s: float, n: int = 400, **kw):
    oracle = GaussianOracle(formulation, MUS2, 0.5 * torch.eye(2, dtype=torch.float64), empty=kw.pop("empty", "mixture"))
    labels = torch.arange(n) % 2
    res = sample(oracle, formulation=formulation, shape=(2,), labels=labels, seeds=range(n),
                 guidance=guidance, cfg_scale=s, num_classes=2, steps=kw.pop("steps", 30), **kw)
    return res, labels, oracle


@pytest.mark.parametrize("formulation", ["diffusion", "flow"])
def test_cfg_at_zero_is_the_conditional_sampler(formulation):
    cond, _, _ = _mix_sample(formulation, "none", 0.0)
    cfg0, _, _ = _mix_sample(formulation, "cfg", 0.0)
    assert torch.equal(cond.x, cfg0.x)
    assert cond.nfe == 30 and cfg0.nfe == 60


@pytest.mark.parametrize("formulation", ["diffusion", "flow"])
def test_cfg_pushes_samples_along_cond_minus_uncond(formulation):
    cond, labels, _ = _mix_sample(formulation, "none", 0.0)
    cfg, _, _ = _mix_sample(formulation, "cfg", 1.0)
    sign = labels.float() * 2 - 1                                          # class 1 at +2, class 0 at -2
    shift = ((cfg.x[:, 0] - cond.x[:, 0]) * sign).mean()
    assert shift > 0.1                                                     # away from the other class
    assert (cfg.x[:, 1] - cond.x[:, 1]).abs().mean() < 0.5 * shift         # not across it


def test_removed_empty_class_uses_the_mean_over_labels():
    with_mean, _, _ = _mix_sample("flow", "cfg", 1.5, empty="mean")       # empty label = mean of class outputs
    removed, _, oracle = _mix_sample("flow", "cfg", 1.5, empty_class=False, empty="mean")
    assert torch.allclose(with_mean.x, removed.x, atol=1e-5)
    assert removed.nfe == 3 * 30 and oracle.calls[0][0] == 3 * 400         # (1 + N) * B in one forward


def test_nfe_counts():
    kw = dict(formulation="flow", shape=(2,), labels=torch.arange(4) % 5, seeds=range(4), num_classes=5)
    model = GaussianOracle("flow", MU[None].repeat(5, 1), SIGMA)
    nfe = lambda **k: sample(model, **kw, **k).nfe
    assert nfe(steps=7) == 7 and nfe(steps=7, guidance="mg") == 7
    assert nfe(steps=7, guidance="cfg") == 14 and nfe(steps=7, guidance="mg+cfg") == 14
    assert nfe(steps=7, sampler="heun") == 13 and nfe(steps=7, sampler="heun", guidance="cfg") == 26
    assert nfe(steps=7, guidance="cfg", empty_class=False) == 6 * 7
    assert nfe(steps=7, guidance="cfg", empty_class=False, uncond_labels=2) == 3 * 7
    ddpm = GaussianOracle("diffusion", MU[None].repeat(5, 1), SIGMA)
    assert sample(ddpm, **{**kw, "formulation": "diffusion"}, steps=25).nfe == 25


def test_cond_and_uncond_equals_separate_forwards():
    torch.manual_seed(0)
    model = build_model("DiT-XS/2", input_shape=(1, 8, 8), num_classes=3, w_input=True).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x, t, y, w = torch.randn(5, 1, 8, 8), torch.rand(5) * 999, torch.tensor([0, 1, 2, 1, 0]), torch.rand(5) + 1
    cond, uncond = cond_and_uncond(model, x, t, y, num_classes=3, w_cond=w)
    with torch.no_grad():
        assert torch.allclose(cond, model(x, t, y, w=w), atol=1e-5)
        assert torch.allclose(uncond, model(x, t, torch.full_like(y, 3), w=torch.zeros(5)), atol=1e-5)


def test_removed_empty_class_is_the_mean_of_label_forwards():
    torch.manual_seed(0)
    model = build_model("MLP-S", input_shape=(2,), num_classes=4, empty_class=False)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x, t, y = torch.randn(6, 2), torch.rand(6) * 1000, torch.tensor([0, 1, 2, 3, 0, 1])
    with torch.no_grad():
        per_label = torch.stack([model(x, t, torch.full_like(y, k)) for k in range(4)])     # (4, B, 2)
        cond, uncond = cond_and_uncond(model, x, t, y, num_classes=4, empty_class=False)
        assert torch.allclose(cond, model(x, t, y), atol=1e-6)
        assert torch.allclose(uncond, per_label.mean(0), atol=1e-6)
        _, some = cond_and_uncond(model, x, t, y, num_classes=4, empty_class=False, uncond_labels=2,
                                  generator=torch.Generator().manual_seed(3))
    sets = draw_uncond_labels(6, 4, 2, torch.Generator().manual_seed(3))
    assert sets.shape == (6, 2) and all(len(set(r.tolist())) == 2 for r in sets)             # distinct labels
    expected = per_label[sets.T, torch.arange(6)].mean(0)
    assert torch.allclose(some, expected, atol=1e-6)


def test_cfg_combine_guides_the_eps_part_only():
    cond, uncond = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    out = cfg_combine(cond, uncond, 0.5, learn_sigma=True)
    assert torch.allclose(out[:, :2], cond[:, :2] + 0.5 * (cond[:, :2] - uncond[:, :2]))
    assert torch.equal(out[:, 2:], cond[:, 2:])
    assert split_sigma(out, False)[1] is None and split_sigma(out, True)[1].shape == (3, 2, 2, 2)
    assert torch.equal(net_time("flow", torch.tensor([0.25])), torch.tensor([250.0]))
    assert torch.equal(net_time("diffusion", torch.tensor([7])), torch.tensor([7.0]))


# ----------------------------------------------------------------------------- seeds, w, learn_sigma


@pytest.mark.parametrize("formulation,sampler,guidance,empty", [
    ("diffusion", "ddpm", "cfg", True), ("flow", "euler_maruyama", "none", True), ("flow", "heun", "cfg", False)])
def test_samples_do_not_depend_on_the_batch(formulation, sampler, guidance, empty):
    torch.manual_seed(0)
    model = build_model("DiT-XS/2", input_shape=(1, 4, 4), num_classes=4, empty_class=empty).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    kw = dict(formulation=formulation, shape=(1, 4, 4), sampler=sampler, steps=6, guidance=guidance,
              cfg_scale=1.0, num_classes=4, empty_class=empty, uncond_labels=2, diffusion_steps=100)
    labels, seeds = torch.tensor([3, 1, 0, 2]), [11, 12, 13, 14]
    whole = sample(model, labels=labels, seeds=seeds, **kw).x
    parts = torch.cat([sample(model, labels=labels[i:i + 2], seeds=seeds[i:i + 2], **kw).x for i in (0, 2)])
    assert torch.allclose(whole, parts, atol=1e-5)
    assert not torch.allclose(whole[0], whole[1])


class RecordW:
    """A w-input toy model that records the w it is fed."""

    w_input = True

    def __init__(self) -> None:
        self.ws: list[torch.Tensor] = []

    def __call__(self, x, t_net, y, w=None):
        self.ws.append(w.clone())
        return 0.1 * x


def test_w_is_fed_to_w_input_models():
    kw = dict(formulation="flow", shape=(2,), labels=torch.tensor([0, 1]), seeds=[0, 1], steps=2, num_classes=2)
    with pytest.raises(ValueError, match="needs w"):
        sample(RecordW(), guidance="mg", **kw)
    m = RecordW()
    sample(m, guidance="mg", w=2.5, **kw)
    assert len(m.ws) == 2 and torch.equal(m.ws[0], torch.full((2,), 2.5))
    m = RecordW()
    sample(m, guidance="mg+cfg", w=2.5, cfg_scale=0.3, **kw)
    assert torch.equal(m.ws[0], torch.tensor([2.5, 2.5, 0.0, 0.0]))
    m = RecordW()
    sample(m, guidance="cfg", cfg_scale=0.3, **kw)
    assert torch.equal(m.ws[0], torch.tensor([1.0, 1.0, 0.0, 0.0]))         # unguided cond: w = 1


def test_learned_variance_interpolates_between_posterior_and_beta():
    oracle = GaussianOracle("diffusion", MU[None], SIGMA, T=100)
    kw = dict(formulation="diffusion", shape=(2,), labels=torch.zeros(500, dtype=torch.long), seeds=range(500),
              steps=20, num_classes=1, diffusion_steps=100)
    with_var = lambda v: (lambda x, t, y, w=None: torch.cat([oracle(x, t, y), torch.full_like(x, v)], dim=1))
    fixed = sample(oracle, **kw).x
    low = sample(with_var(-1.0), learn_sigma=True, **kw).x
    high = sample(with_var(1.0), learn_sigma=True, **kw).x
    assert torch.allclose(fixed, low, atol=1e-6)                            # frac 0 = clipped posterior variance
    assert torch.cov(high.T.double()).trace() > torch.cov(low.T.double()).trace()  # beta > posterior variance


def test_bad_arguments_fail_clearly():
    kw = dict(shape=(2,), labels=torch.tensor([0]), seeds=[0], num_classes=1)
    oracle = GaussianOracle("flow", MU[None], SIGMA)
    with pytest.raises(ValueError, match="does not fit"):
        sample(oracle, formulation="flow", sampler="ddpm", **kw)
    with pytest.raises(ValueError, match="one seed per label"):
        sample(oracle, formulation="flow", **{**kw, "seeds": [0, 1]})
    with pytest.raises(ValueError, match="unknown guidance"):
        sample(oracle, formulation="flow", guidance="pag", **kw)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("sampler,formulation", [("ddpm", "diffusion"), ("euler_maruyama", "flow")])
def test_samples_do_not_depend_on_the_device(sampler, formulation):
    torch.manual_seed(0)
    model = build_model("DiT-XS/2", input_shape=(2, 8, 8), num_classes=4, learn_sigma=sampler == "ddpm").eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    kw = dict(formulation=formulation, shape=(2, 8, 8), labels=torch.tensor([0, 1, 2, 3]), seeds=[5, 6, 7, 8],
              sampler=sampler, steps=8, guidance="cfg", cfg_scale=0.5, num_classes=4,
              learn_sigma=sampler == "ddpm", diffusion_steps=1000)
    cpu = sample(model, **kw).x
    gpu = sample(model.cuda(), **kw)
    assert gpu.x.is_cuda and torch.allclose(gpu.x.cpu(), cpu, atol=1e-3)
