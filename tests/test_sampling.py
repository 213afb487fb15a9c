"""Samplers and the guidance helper against closed forms (exact eps / velocity of Gaussian data)."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import STUDIES

from mgbench.config import load_train_config
from mgbench.trainer.formulation import respaced_timesteps
from mgbench.trainer.guidance import cfg_combine, cond_and_uncond, draw_uncond_labels
from mgbench.trainer.models import build_model
from mgbench.trainer.sampling import sample

torch.set_num_threads(1)

MU = torch.tensor([1.5, -1.0], dtype=torch.float64)
SIGMA = torch.tensor([[1.0, 0.6], [0.6, 0.8]], dtype=torch.float64)


def abar_linear(T: int) -> torch.Tensor:
    """alpha-bar of DDPM's linear betas 1e-4 .. 0.02 (scaled by 1000 / T), written out here, float64."""
    return torch.cumprod(1 - torch.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T, dtype=torch.float64), dim=0)


class GaussianOracle:
    """The exact eps (DDPM) or velocity (flow) of a mixture of Gaussians N(mu_k, Sigma), one per class.

    Label k < K is component k; label K (the empty class) is the mixture with equal weights,
    or the mean of the K class predictions when `empty="mean"`.
    """

    def __init__(self, formulation: str, mus: torch.Tensor, sigma: torch.Tensor, T: int = 1000,
                 empty: str = "mixture") -> None:
        self.formulation, self.mus, self.sigma, self.empty = formulation, mus.double(), sigma.double(), empty
        self.abar = abar_linear(T)
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


# ----------------------------------------------------------------------------- DDIM and a Gaussian's std

DIGITS_DIT = STUDIES / "base" / "digits-dit.yaml"
S2 = 0.25                                                                 # x0 ~ N(0, 0.5^2) per coordinate


def exact_eps_1d(x, t_net, y, w=None):
    """E[eps | x_t] for x0 ~ N(0, 0.5^2) i.i.d.: sqrt(1 - abar) x_t / (abar * 0.25 + 1 - abar)."""
    abar = abar_linear(1000)[t_net.long()].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return (1 - abar).sqrt() * x / (abar * S2 + 1 - abar)


def linear_gaussian_std(sampler: str, steps: int, spacing: str = "linear") -> float:
    """The exact output std of DDPM (fixed-small) or DDIM for that data, by the variance recursion in float64."""
    use = respaced_timesteps(1000, steps, spacing)
    abar = abar_linear(1000)[use].tolist()
    var = 1.0
    for i in reversed(range(len(use))):
        a, ap = abar[i], (abar[i - 1] if i > 0 else 1.0)
        x0_gain = math.sqrt(a) * S2 / (a * S2 + 1 - a)                     # E[x0 | x_t] = x0_gain * x_t
        eps_gain = math.sqrt(1 - a) / (a * S2 + 1 - a)
        if sampler == "ddim":
            var *= (math.sqrt(ap) * x0_gain + math.sqrt(1 - ap) * eps_gain) ** 2
        else:                                                                # posterior q(x_prev | x_t, x0 = E[x0 | x_t])
            beta = 1 - a / ap
            gain = (beta * math.sqrt(ap) * x0_gain + (1 - ap) * math.sqrt(1 - beta)) / (1 - a)
            var = gain ** 2 * var + (beta * (1 - ap) / (1 - a) if i > 0 else 0.0)
    return math.sqrt(var)


def _std_1d(sampler: str, steps: int, learn_sigma: bool = False, spacing: str = "linear") -> float:
    """Std of 80,000 points (200 samples of shape (400,)) drawn with the exact eps (SE about 0.25%)."""
    model = exact_eps_1d
    if learn_sigma:                                                          # a variance half the sampler may use or ignore
        model = lambda x, t, y, w=None: torch.cat([exact_eps_1d(x, t, y), torch.zeros_like(x)], dim=1)
    res = sample(model, formulation="diffusion", shape=(400,), labels=torch.zeros(200, dtype=torch.long),
                 seeds=range(200), sampler=sampler, steps=steps, num_classes=1, learn_sigma=learn_sigma,
                 spacing=spacing)
    return res.x.double().std().item()


def test_gaussian_std_digits_dit_sampler():
    """The sampler of studies/base/digits-dit.yaml returns N(0, 0.5^2) data with std within 2% of 0.5.

    Measured (80k points, exact eps; the recursion's value in brackets): ddpm fixed-small 50 steps 0.443
    [0.4432], ddpm 250 0.485 [0.4858], ddim 50 0.473 [0.4719], ddim 100 [0.4858], ddim 250 0.496 [0.4943].
    Fixed-large variance (beta) overshoots: 50 steps 0.5176, 100 0.5086 (recursion). No sampler tried passes
    at 50 respaced steps: the deficit sits in the coarse low-noise steps (t = 20 -> 0, 41 -> 20, ...). Quadratic
    spacing puts the steps there: ddim 100 quadratic [0.4916] passes at 2/5 of the cost of ddim 250 linear.
    """
    cfg = load_train_config(DIGITS_DIT)
    assert cfg.objective.formulation == "diffusion" and cfg.objective.diffusion_steps == 1000
    std = _std_1d(cfg.sample.sampler, cfg.sample.steps, cfg.model.learn_sigma, cfg.sample.spacing)
    assert abs(std - 0.5) < 0.01, (cfg.sample.sampler, cfg.sample.steps, std)


@pytest.mark.parametrize("sampler,steps,spacing", [("ddpm", 50, "linear"), ("ddpm", 250, "linear"),
                                                    ("ddim", 50, "linear"), ("ddim", 250, "linear"),
                                                    ("ddim", 100, "quadratic"), ("ddpm", 100, "quadratic")])
def test_gaussian_std_matches_the_variance_recursion(sampler, steps, spacing):
    """Monte Carlo std within 1% of the closed-form recursion; fixed-small DDPM at 50 steps is 11% short."""
    std = _std_1d(sampler, steps, spacing=spacing)
    assert abs(std / linear_gaussian_std(sampler, steps, spacing) - 1) < 0.01, std
    if (sampler, steps) == ("ddpm", 50):
        assert std < 0.45


def test_ddim_follows_the_exact_ode_map_to_first_order():
    """For Gaussian data DDIM approximates the probability-flow map x_T -> 0.5 x_T / std(x_T), error ~ 1/steps."""
    errors = {}
    for steps in (250, 500, 1000):
        res = sample(exact_eps_1d, formulation="diffusion", shape=(50,), labels=torch.zeros(20, dtype=torch.long),
                     seeds=range(20), sampler="ddim", steps=steps, num_classes=1, return_trajectory=True)
        a_T = abar_linear(1000)[999].item()
        exact = 0.5 * res.trajectory[0].double() / math.sqrt(a_T * S2 + 1 - a_T)
        errors[steps] = (res.x.double() - exact).abs().max().item()
        assert len(res.trajectory) == steps + 1 and res.nfe == steps and res.steps == steps
    assert errors[1000] < 0.01
    assert 1.7 < errors[250] / errors[500] < 2.3 and 1.7 < errors[500] / errors[1000] < 2.3


def test_ddim_is_deterministic_after_the_noise_and_ignores_learned_variance():
    kw = dict(formulation="diffusion", shape=(2,), labels=torch.zeros(64, dtype=torch.long), seeds=range(64),
              steps=20, num_classes=1, diffusion_steps=100)
    oracle = GaussianOracle("diffusion", MU[None], SIGMA, T=100)
    with_var = lambda v: (lambda x, t, y, w=None: torch.cat([oracle(x, t, y), torch.full_like(x, v)], dim=1))
    ddim = sample(oracle, sampler="ddim", return_trajectory=True, **kw)
    assert torch.equal(ddim.x, sample(oracle, sampler="ddim", **kw).x)                     # same seeds, same samples
    for v in (-1.0, 1.0):                                                                 # the variance half is unused
        assert torch.equal(ddim.x, sample(with_var(v), sampler="ddim", learn_sigma=True, **kw).x)
    ddpm = sample(oracle, sampler="ddpm", return_trajectory=True, **kw)
    assert torch.equal(ddim.trajectory[0], ddpm.trajectory[0])                            # same initial noise
    assert (ddim.x - ddpm.x).abs().mean() > 0.05                                          # no step noise


class MixedW:
    """A deterministic w-input toy model whose output depends on x, t, the label and w."""

    w_input = True

    def __call__(self, x, t_net, y, w=None):
        return 0.3 * x + 0.01 * t_net[:, None].sin() + 0.2 * y[:, None].float() - 0.1 * w[:, None]


class ManualCFG:
    """CFG written out by hand as a plain model: cond(y, w) + s * (cond(y, w) - uncond(empty, w = 0))."""

    w_input = True

    def __init__(self, model, s: float, empty: int) -> None:
        self.model, self.s, self.empty = model, s, empty

    def __call__(self, x, t_net, y, w=None):
        cond = self.model(x, t_net, y, w=w)
        uncond = self.model(x, t_net, torch.full_like(y, self.empty), w=torch.zeros_like(w))
        return cond + self.s * (cond - uncond)


@pytest.mark.parametrize("guidance,w", [("cfg", None), ("mg+cfg", 1.5)])
def test_ddim_guidance_uses_the_same_predictor_as_ddpm(guidance, w):
    """DDIM with cfg / mg+cfg equals unguided DDIM on a model that combines cond and uncond by hand."""
    kw = dict(formulation="diffusion", shape=(3,), labels=torch.tensor([0, 1, 2, 1]), seeds=[3, 4, 5, 6],
              sampler="ddim", steps=10, num_classes=3, diffusion_steps=100)
    guided = sample(MixedW(), guidance=guidance, cfg_scale=0.7, w=w, **kw)
    by_hand = sample(ManualCFG(MixedW(), 0.7, empty=3), guidance="mg", w=1.0 if w is None else w, **kw)
    assert torch.allclose(guided.x, by_hand.x, atol=1e-5)
    assert guided.nfe == 20 and by_hand.nfe == 10


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
    assert torch.equal(cfg_combine(cond, uncond, 0.5), cond + 0.5 * (cond - uncond))  # no variance: all channels


# ----------------------------------------------------------------------------- seeds, w, learn_sigma


@pytest.mark.parametrize("formulation,sampler,guidance,empty", [
    ("diffusion", "ddpm", "cfg", True), ("diffusion", "ddim", "cfg", False), ("flow", "euler_maruyama", "none", True),
    ("flow", "heun", "cfg", False)])
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
    with pytest.raises(ValueError, match="does not fit"):
        sample(oracle, formulation="flow", sampler="ddim", **kw)
    with pytest.raises(ValueError, match="does not fit"):
        sample(GaussianOracle("diffusion", MU[None], SIGMA), formulation="diffusion", sampler="heun", **kw)
    with pytest.raises(ValueError, match="one seed per label"):
        sample(oracle, formulation="flow", **{**kw, "seeds": [0, 1]})
    with pytest.raises(ValueError, match="unknown guidance"):
        sample(oracle, formulation="flow", guidance="pag", **kw)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("sampler,formulation", [("ddpm", "diffusion"), ("ddim", "diffusion"), ("euler_maruyama", "flow")])
def test_samples_do_not_depend_on_the_device(sampler, formulation):
    torch.manual_seed(0)
    model = build_model("DiT-XS/2", input_shape=(2, 8, 8), num_classes=4, learn_sigma=formulation == "diffusion").eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    kw = dict(formulation=formulation, shape=(2, 8, 8), labels=torch.tensor([0, 1, 2, 3]), seeds=[5, 6, 7, 8],
              sampler=sampler, steps=8, guidance="cfg", cfg_scale=0.5, num_classes=4,
              learn_sigma=formulation == "diffusion", diffusion_steps=1000)
    cpu = sample(model, **kw).x
    gpu = sample(model.cuda(), **kw)
    assert gpu.x.is_cuda and torch.allclose(gpu.x.cpu(), cpu, atol=1e-3)


def test_quadratic_spacing_keeps_both_ends_and_refines_low_noise():
    use = respaced_timesteps(1000, 100, "quadratic")
    assert use[0] == 0 and use[-1] == 999 and use == sorted(set(use)) and 95 <= len(use) <= 100
    assert use[:3] == [0, 1, 2]                       # (i/99)^2 * 999 = 0.10, 0.41, 0.92, 1.63: the first repeats merge
    assert use[-1] - use[-2] == 999 - round((98 / 99) ** 2 * 999)                   # last gap ~20 steps
    with pytest.raises(ValueError, match="unknown spacing"):
        respaced_timesteps(1000, 10, "cosine")
    res = sample(exact_eps_1d, formulation="diffusion", shape=(3,), labels=torch.zeros(2, dtype=torch.long), seeds=[0, 1],
                 sampler="ddim", steps=100, spacing="quadratic", num_classes=1)
    assert res.steps == res.nfe == len(use) < 100                               # steps taken, repeats merged


@pytest.mark.parametrize("formulation,default", [("diffusion", "ddpm"), ("flow", "euler")])
def test_auto_is_the_formulations_default_sampler(formulation, default):
    kw = dict(formulation=formulation, shape=(2,), labels=torch.zeros(8, dtype=torch.long), seeds=range(8),
              steps=6, num_classes=1, diffusion_steps=100)
    oracle = GaussianOracle(formulation, MU[None], SIGMA, T=100)
    assert torch.equal(sample(oracle, sampler="auto", **kw).x, sample(oracle, sampler=default, **kw).x)
