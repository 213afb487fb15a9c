"""The training step as a unit: same numbers as before it became sync-free, no host reads, foreach EMA,
the chunked N-label teacher (the loop around it: test_trainer.py)."""
import pytest
import torch

from mgbench.config import ObjectiveConfig, train_config_from_dict
from mgbench.trainer.checkpoint import latest_checkpoint, load_checkpoint
from mgbench.trainer.guidance import cond_and_uncond
from mgbench.trainer.models import build_model
from mgbench.trainer.objective import Objective
from mgbench.trainer.step import adamw, lerp_ema, step_modules, train_step
from mgbench import tracking as T

torch.set_num_threads(1)

# Runs of 6 steps (log_every 3) computed with the code from before the sync-free step (per-parameter EMA lerp_,
# `isfinite` + `.item()` every step, teacher subset chosen by `nonzero` on the device), 1 thread, on this repo's
# CPU machine. The new step reproduced every number bit for bit there.
BEFORE = {
    "flow_mg_half": {
        "config": {"data": {"name": "grid2d"}, "model": {"arch": "MLP-S"},
                   "objective": {"w": 1.5, "t_high": 0.75, "mg_fraction": 0.5}},
        "losses": [2.6179492473602295, 3.774282455444336, 2.4036831855773926, 2.7798259258270264,
                   2.6173434257507324, 2.4507179260253906],
        "logged_loss": [2.931971629460653, 2.6159624258677163], "logged_mg": [0.3541666666666667, 0.3697916666666667],
        "model_sum": 513.8539788777375, "ema_sum": 514.7690932798382},
    "ddpm_noempty_other": {
        "config": {"data": {"name": "grid2d"}, "model": {"arch": "MLP-S"},
                   "objective": {"formulation": "diffusion", "w": 1.5, "empty_class": False, "label_drop": 0.0,
                                 "uncond_estimate": "other_label"}},
        "losses": [0.5346261858940125, 2.343177318572998, 0.6398584246635437, 0.8991284966468811,
                   1.3364530801773071, 0.9061825275421143],
        "logged_loss": [1.1725539763768513, 1.047254701455434], "logged_mg": [0.5208333333333334, 0.5208333333333334],
        "model_sum": 498.9284793773586, "ema_sum": 500.4916756857216},
    "dit_sigma_winput": {
        "config": {"data": {"name": "digits"}, "model": {"arch": "DiT-XS/2", "learn_sigma": True, "w_input": True},
                   "objective": {"formulation": "diffusion", "w_range": [1.0, 2.0], "mg_fraction": 0.5,
                                 "t_high": 0.9},
                   "optim": {"batch_size": 16, "grad_clip": 1.0}},
        "losses": [1.0759668350219727, 1.0737334489822388, 0.9404557943344116, 0.9400809407234192,
                   0.9662673473358154, 0.8136452436447144],
        "logged_loss": [1.0300520261128743, 0.906664510567983], "logged_mg": [0.25, 0.3333333333333333],
        "model_sum": 557.8038594600572, "ema_sum": 556.608405797996},
    "dit_noempty_n4": {
        "config": {"data": {"name": "digits"}, "model": {"arch": "DiT-XS/2"},
                   "objective": {"w": 1.4, "empty_class": False, "label_drop": 0.0, "uncond_labels": 4},
                   "optim": {"batch_size": 16}},
        "losses": [1.7946959733963013, 1.680757761001587, 1.6306991577148438, 1.6049188375473022,
                   1.5847246646881104, 1.409511923789978],
        "logged_loss": [1.7020509640375774, 1.5330518086751301], "logged_mg": [0.75, 0.6875],
        "model_sum": 510.93167471919287, "ema_sum": 511.52949841127827},
}


def _config(name, out, **objective):
    d = {"name": name, "out_dir": str(out), "optim": {"lr": 1e-3, "batch_size": 64, "ema_decay": 0.99},
         "train": {"steps": 6, "log_every": 3, "ckpt_every": 6}, "sample": {"steps": 2, "n_grid": 4}}
    for k, v in BEFORE[name]["config"].items():
        d.setdefault(k, {}).update(v)
    d["objective"].update(objective)
    return train_config_from_dict(d, name)


@pytest.mark.parametrize("name, chunk", [("flow_mg_half", None), ("ddpm_noempty_other", None),
                                         ("dit_sigma_winput", None), ("dit_noempty_n4", 3)])
def test_training_reproduces_the_numbers_from_before_the_sync_free_step(tmp_path, name, chunk):
    """Losses per step, logged window means and final weights; with chunk 3 the N = 4 teacher runs in 2 forwards."""
    from mgbench.trainer.loop import train

    ref, tr = BEFORE[name], T.MemoryTracker()
    result = train(_config(name, tmp_path / "r", **({} if chunk is None else {"uncond_chunk": chunk})), tr)
    state = load_checkpoint(latest_checkpoint(tmp_path / "r"))
    rel = 1e-6 if chunk is None else 1e-5  # a chunked mean sums in another order: rounding only
    assert [s for s, _ in result.losses] == list(range(1, 7))
    assert [v for _, v in result.losses] == pytest.approx(ref["losses"], rel=rel)
    assert tr.series(T.M_LOSS) == pytest.approx(ref["logged_loss"], rel=rel)
    assert tr.series(T.M_LOSS_MG) == ref["logged_mg"]  # shares of a drawn mask: exact
    for key in ("model", "ema"):
        assert float(sum(v.double().sum() for v in state[key].values())) == pytest.approx(ref[f"{key}_sum"], rel=rel)


def _meta_step(oc: ObjectiveConfig, **model_kw):
    """One train_step with model and data on the meta device, where any read of a value raises."""
    dev = torch.device("meta")
    model = build_model("DiT-XS/2", input_shape=(1, 8, 8), num_classes=10, empty_class=oc.empty_class,
                        **model_kw).to(dev)
    m = step_modules(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    obj = Objective(oc, 10, model_kw.get("w_input", False), model_kw.get("learn_sigma", False))
    nz = obj.draw(8, (1, 8, 8), torch.Generator().manual_seed(0), oc.w)
    x0, y = torch.randn(8, 1, 8, 8, device=dev), torch.arange(8, device=dev)
    return train_step(m, obj, x0, y, nz, mg_on=True, ema_decay=0.9, grad_clip=1.0), nz, obj


@pytest.mark.parametrize("oc, model_kw", [
    (ObjectiveConfig(w=1.5), {}),
    (ObjectiveConfig(formulation="diffusion", w=1.5, empty_class=False, label_drop=0.0, uncond_labels=4,
                     uncond_chunk=2), {}),
    (ObjectiveConfig(formulation="diffusion", w_range=[1.0, 2.0], empty_class=False, label_drop=0.0,
                     uncond_estimate="other_label"), {"learn_sigma": True, "w_input": True})])
def test_train_step_never_reads_a_value_back_from_the_device(oc, model_kw):
    """Meta tensors have no values: `.item()`, `nonzero`, `if tensor` or `.tolist()` on one raise, so a step
    that runs through is free of host syncs (the MG share comes from the host-side noise)."""
    (loss, share), nz, obj = _meta_step(oc, **model_kw)
    assert loss.device.type == "meta" and loss.shape == () and not loss.requires_grad
    assert share == obj.guided(nz, True).float().mean().item() and 0 < share < 1
    with pytest.raises((RuntimeError, NotImplementedError)):
        loss.item()  # the probe itself: a read does raise here


def test_foreach_ema_equals_a_per_parameter_ema_bit_for_bit():
    torch.manual_seed(0)
    model = build_model("DiT-XS/2", input_shape=(1, 8, 8), num_classes=10, learn_sigma=True)
    ema = build_model("DiT-XS/2", input_shape=(1, 8, 8), num_classes=10, learn_sigma=True)
    by_hand = [p.detach().clone() for p in ema.parameters()]
    for d in (0.1, 0.5, 0.9, 0.9999):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        lerp_ema(ema, model, d)
        for e, p in zip(by_hand, model.parameters()):  # the per-parameter update the trainer used before
            e.lerp_(p.detach(), 1 - d)
    assert len(by_hand) > 20 and all(torch.equal(a, b) for a, b in zip(ema.parameters(), by_hand))


def test_ema_is_the_decayed_average_in_closed_form():
    ema, model = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    start = [p.detach().double().clone() for p in ema.parameters()]
    lerp_ema(ema, model, 0.75)
    for e, s, p in zip(ema.parameters(), start, model.parameters()):
        torch.testing.assert_close(e.double(), 0.75 * s + 0.25 * p.detach().double(), rtol=1e-6, atol=1e-7)


def test_fused_adamw_takes_the_adamw_step_written_out_by_hand():
    """The fused AdamW of a compiled run: AdamW's update in closed form (bias-corrected moments, decoupled decay),
    over three steps of fixed gradients."""
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    lr, wd, (b1, b2), eps = 1e-2, 0.1, (0.9, 0.99), 1e-8
    opt = adamw(net, lr, wd, (b1, b2), fused=True)
    assert opt.defaults["fused"] is True
    p = [q.detach().double().clone() for q in net.parameters()]
    m, v = [torch.zeros_like(q) for q in p], [torch.zeros_like(q) for q in p]
    grads = [[torch.randn_like(q) for q in p] for _ in range(3)]
    for k, gs in enumerate(grads, start=1):
        for q, g in zip(net.parameters(), gs):
            q.grad = g.float()
        opt.step()
        for i, g in enumerate(gs):
            p[i] = p[i] * (1 - lr * wd)
            m[i], v[i] = b1 * m[i] + (1 - b1) * g, b2 * v[i] + (1 - b2) * g * g
            p[i] = p[i] - lr * (m[i] / (1 - b1 ** k)) / ((v[i] / (1 - b2 ** k)).sqrt() + eps)
    for q, want in zip(net.parameters(), p):
        torch.testing.assert_close(q.detach().double(), want, rtol=1e-5, atol=1e-6)


def test_a_compiled_run_fuses_adamw_and_an_eager_one_does_not(tmp_path):
    from mgbench.trainer import distributed as D
    from mgbench.trainer.build import run_dataset
    from mgbench.trainer.loop import build_step_modules

    for compile in (False, True):
        cfg = train_config_from_dict({"out_dir": str(tmp_path), "data": {"name": "grid2d"}, "model": {"arch": "MLP-S"},
                                      "train": {"compile": compile, "device": "cpu"}})
        env = D.setup("cpu")
        m = build_step_modules(cfg, run_dataset(cfg, tmp_path, env.device), env)
        assert bool(m.opt.defaults["fused"]) is compile
        assert (m.net is m.model) is not compile


# ----------------------------------------------------------------------------- chunked N-label teacher


class LabelNet(torch.nn.Module):
    """A teacher whose output depends on x, t, the label and w, recording the batch size of each forward."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.table, self.batches = torch.randn(classes + 1, 3, generator=torch.Generator().manual_seed(1)), []

    def forward(self, x, t, y, w=None):
        self.batches.append(len(x))
        out = torch.tanh(x * self.table[y] + 0.001 * t[:, None])
        return out if w is None else out * (1 + w[:, None])


@pytest.mark.parametrize("n, chunk, rows", [(10, 4, [5, 4, 2]), (10, 5, [6, 5]), (10, 1, [2] + [1] * 9),
                                           (10, 10, [11]), (7, 0, [8])])
def test_chunked_n_label_mean_equals_one_forward_and_caps_its_batch(n, chunk, rows):
    """rows: label rows per teacher forward (the first one also holds the conditional row)."""
    b, classes = 6, 12
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(b, 3, generator=gen), torch.rand(b, generator=gen)
    y = torch.randint(0, classes, (b,), generator=gen)
    sets = torch.stack([torch.randperm(classes, generator=gen)[:n] for _ in range(b)])  # (B, N)
    net = LabelNet(classes)
    w = torch.rand(b, generator=gen)
    cond, uncond = cond_and_uncond(net, x, t, y, num_classes=classes, empty_class=False,
                                   uncond_label_sets=sets, w_cond=w, chunk=chunk)
    assert net.batches == [r * b for r in rows]
    per_label = torch.stack([net(x, t, sets[:, j], torch.zeros(b)) for j in range(n)])  # by hand, one label a time
    torch.testing.assert_close(uncond, per_label.double().mean(0).float(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(cond, net(x, t, y, w), rtol=0, atol=0)


def test_objective_with_a_chunked_teacher_gives_the_same_loss():
    oc = dict(w=1.5, t_high=1.0, empty_class=False, label_drop=0.0)
    torch.manual_seed(0)
    model = build_model("MLP-S", input_shape=(2,), num_classes=5, empty_class=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(2)
    x0, y = torch.randn(32, 2, generator=gen), torch.randint(0, 5, (32,), generator=gen)
    losses = []
    for chunk in (0, 2, 1):
        obj = Objective(ObjectiveConfig(**oc, uncond_chunk=chunk), 5)
        nz = obj.draw(32, (2,), torch.Generator().manual_seed(3), 1.5)
        losses.append(obj.loss(model, model, x0, y, nz, mg_on=True)[0].item())
    assert losses[0] > 0
    assert losses[1] == pytest.approx(losses[0], rel=1e-6) and losses[2] == pytest.approx(losses[0], rel=1e-6)


def test_uncond_chunk_is_validated():
    from mgbench.config import ConfigError

    with pytest.raises(ConfigError, match=r"^c:objective\.uncond_chunk: -1 is outside \[0, 1000000\]$"):
        train_config_from_dict({"objective": {"uncond_chunk": -1}}, "c")
    assert train_config_from_dict({}, "c").objective.uncond_chunk == 4
