"""Learned guidance: networks, losses, parameterisation, training, resume, CLI, bench."""

from __future__ import annotations

import json

import pytest
import torch

from tiltgen.cli.main import main
from tiltgen.core.reward import as_reward
from tiltgen.core.samplers import sample
from tiltgen.core.schedules import RectifiedFlow, VPLinear
from tiltgen.errors import TiltgenError
from tiltgen.eval.analytic_cases import CASES, FAMILIES
from tiltgen.tilt import GuidedModel
from tiltgen.tilt.learned import (ConvConfig, GuidancePotential, LOSSES, MLPConfig, PotentialConvNet, PotentialMLP,
                                  TrainConfig, load_guidance, tilt_loss, train_guidance)

RING = CASES["ring2d-linear-b2"]


def small_config(**overrides) -> TrainConfig:
    base = dict(beta=2.0, steps=120, batch_size=512, n_data=600, pool_size=6000, time_levels=12, data_steps=12,
                data_dtype="float64", checkpoint_every=40, seed=3)
    base.update(overrides)
    return TrainConfig(**base)


def ring_model(family: str = "flow"):
    fam = FAMILIES[family]
    return RING.base.model(fam.schedule, fam.prediction), fam


# --- networks ------------------------------------------------------------------------------
@pytest.mark.parametrize("linear_skip", [False, True])
def test_mlp_handwritten_gradient_matches_autograd(linear_skip):
    torch.manual_seed(0)
    net = PotentialMLP(MLPConfig(dim=3, hidden=16, depth=3, cond_dim=4, linear_skip=linear_skip)).double()
    for p in net.parameters():  # the output layer starts at zero; make the test non-trivial
        torch.nn.init.normal_(p, std=0.5)
    z = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    t, emb = torch.rand(7, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)
    value, grad = net.value_and_grad(z, t, emb)
    (auto,) = torch.autograd.grad(net(z, t, emb).sum(), z)
    torch.testing.assert_close(value, net(z, t, emb))
    torch.testing.assert_close(grad, auto)
    # the same t for every row (the sampler's case) takes the broadcast path
    t_same = torch.full((7,), 0.3, dtype=torch.float64)
    (auto_same,) = torch.autograd.grad(net(z, t_same, emb).sum(), z)
    torch.testing.assert_close(net.value_and_grad(z, t_same, emb)[1], auto_same)


def test_conv_net_coordinate_channels_see_position():
    torch.manual_seed(0)
    net = PotentialConvNet(ConvConfig(channels=3, width=8, depth=2, coords=True))
    torch.nn.init.normal_(net.head.weight)
    left, right = torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16)
    left[..., 6:10, 1:5], right[..., 6:10, 11:15] = 1.0, 1.0  # the same blob, mirrored
    t = torch.full((1,), 0.5)
    assert not torch.allclose(net(left, t), net(right, t))
    value, grad = net.value_and_grad(left, t)
    assert grad.shape == left.shape and torch.isfinite(grad).all()


def test_conv_net_on_random_images_is_conditioned_on_t_and_text():
    torch.manual_seed(0)
    net = PotentialConvNet(ConvConfig(channels=3, width=8, depth=3, cond_dim=5))
    torch.nn.init.normal_(net.head.weight)
    x, emb = torch.randn(4, 3, 16, 16), torch.randn(4, 5)
    t = torch.rand(4)
    value, grad = net.value_and_grad(x, t, emb)
    assert value.shape == (4,) and grad.shape == x.shape and torch.isfinite(grad).all()
    assert not torch.allclose(net(x, t, emb), net(x, t, torch.randn(4, 5)))
    assert not torch.allclose(net(x, t, emb), net(x, 1 - t, emb))
    with pytest.raises(TiltgenError, match="embedding"):
        net(x, t)
    with pytest.raises(TiltgenError, match="images"):
        net(torch.randn(4, 1, 16, 16), t, emb)


# --- losses and parameterisation --------------------------------------------------------------
@pytest.mark.parametrize("kind", LOSSES)
def test_every_loss_is_minimised_at_log_mean_weight(kind):
    # A constant logit l sees weights w of states with the same x_t: the optimum is log E[w | x_t].
    w = torch.distributions.LogNormal(0.0, 1.0).sample((20000,), ).double()
    best = torch.log(w.mean()).clone().requires_grad_(True)
    (slope,) = torch.autograd.grad(tilt_loss(kind, best.expand(len(w)), w), best)
    assert abs(float(slope)) < 1e-9


@pytest.mark.parametrize("schedule", [RectifiedFlow(), VPLinear()])
def test_x0_shift_is_finite_at_the_ends_and_equals_scaled_gradient(schedule):
    torch.manual_seed(0)
    net = PotentialMLP(MLPConfig(dim=2, hidden=8)).double()
    torch.nn.init.normal_(net.out.weight)
    pot = GuidancePotential(net, schedule, s_data=2.0)
    x = torch.randn(5, 2, dtype=torch.float64) * 3
    for t_val, check in ((1.0, "finite"), (0.0, "zero"), (0.4, "grad")):
        t = torch.full((5,), t_val, dtype=torch.float64)
        logit, shift = pot.logit_and_shift(x, t)
        assert torch.isfinite(shift).all() and torch.isfinite(logit).all()
        if check == "zero":
            assert torch.allclose(shift, torch.zeros_like(shift))
        if check == "grad":
            xg = x.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(pot.logit(xg, torch.rand(5, dtype=torch.float64) * 0 + t).sum(), xg)
            a, s = float(schedule.alpha(torch.tensor(t_val))), float(schedule.sigma(torch.tensor(t_val)))
            torch.testing.assert_close(shift, s**2 / a * g)
    if isinstance(schedule, RectifiedFlow):  # h_1 is constant: the logit vanishes at pure noise
        assert torch.allclose(pot.logit(x, torch.ones(5, dtype=torch.float64)), torch.zeros(5, dtype=torch.float64))


# --- training against the exact oracle -------------------------------------------------------
def test_trained_shift_matches_exact_oracle():
    model, fam = ring_model("flow")
    result = train_guidance(model, fam.schedule, RING.reward, small_config(steps=300, n_data=1500, pool_size=15000, time_levels=20), shape=(2,),
                            progress=False)
    oracle = RING.tilt().oracle(fam.schedule)
    torch.manual_seed(1)
    x0 = RING.base.sample(400, torch.Generator().manual_seed(1))
    errors = []
    for t_val in (0.9, 0.6, 0.3):
        t = torch.full((400,), t_val, dtype=torch.float64)
        x = (1 - t_val) * x0 + t_val * torch.randn_like(x0)
        exact = oracle.x0_shift(x, t)
        learned = result.guidance(x, t, None, x).x0_shift
        errors.append(float((learned - exact).norm(dim=1).mean() / exact.norm(dim=1).mean()))
    # a zero shift (no guidance) has relative error 1; small shifts at low t are relatively hardest
    # (the default 3 x 128 network with its linear skip gave 0.15, 0.26, 0.51 here)
    assert errors[0] < 0.25 and errors[1] < 0.35 and errors[2] < 0.6, errors
    assert result.record["train_model_evals"] > 0 and result.record["train_reward_evals"] == 1500


def test_non_differentiable_reward_trains_and_guides():
    model, fam = ring_model("vp")
    threshold = as_reward(lambda x0: 2.0 * (x0[:, 0] > 0).to(x0.dtype), differentiable=False, name="right-half")
    config = small_config(beta=1.0, spacing="logsnr")
    result = train_guidance(model, fam.schedule, threshold, config, shape=(2,), progress=False)
    kwargs = dict(shape=(2,), seeds=range(500), steps=12, spacing="logsnr", dtype=torch.float64, progress=False)
    base = sample(model, fam.schedule, **kwargs)
    guided = sample(GuidedModel(model, fam.schedule, result.guidance), fam.schedule, **kwargs)
    # exact: p*(x > 0) = 0.5 e^2 / (0.5 e^2 + 0.5) = 0.88
    assert float((base[:, 0] > 0).double().mean()) < 0.6
    assert float((guided[:, 0] > 0).double().mean()) > 0.75  # measured 0.80 with this small budget


def test_trajectory_mode_trains_on_the_samplers_own_states():
    model, fam = ring_model("vp")
    config = small_config(trajectory=True, sampler="ddpm", data_steps=8, spacing="logsnr")
    result = train_guidance(model, fam.schedule, RING.reward, config, shape=(2,), progress=False)
    kwargs = dict(shape=(2,), seeds=range(500), steps=8, sampler="ddpm", spacing="logsnr", dtype=torch.float64,
                  progress=False)
    base = RING.reward(sample(model, fam.schedule, **kwargs)).mean()
    guided = RING.reward(sample(GuidedModel(model, fam.schedule, result.guidance), fam.schedule, **kwargs)).mean()
    exact = RING.tilt().tilted.expected_reward(RING.reward)
    assert float(guided - base) > 0.7 * float(exact - base)


# --- checkpoints and resume -------------------------------------------------------------------
class Crash(Exception):
    pass


def _full_and_resumed(tmp_path, config: TrainConfig, interrupt: type[BaseException], at_step: int):
    """(an uninterrupted run, a run interrupted by ``interrupt`` after ``at_step`` and resumed) on the ring."""
    model, fam = ring_model("flow")
    full = train_guidance(model, fam.schedule, RING.reward, config, shape=(2,), out_dir=tmp_path / "full",
                          progress=False)

    def kill(step: int, loss: float) -> None:
        if step == at_step:
            raise interrupt()

    with pytest.raises(interrupt):
        train_guidance(model, fam.schedule, RING.reward, config, shape=(2,), out_dir=tmp_path / "cut",
                       progress=False, on_step=kill)
    resumed = train_guidance(model, fam.schedule, RING.reward, config, shape=(2,), out_dir=tmp_path / "cut",
                             resume=True, progress=False)
    return full, resumed


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, Crash])
def test_interrupted_training_resumes_to_the_same_final_loss(tmp_path, interrupt):
    config = small_config(steps=30, checkpoint_every=10, n_data=200, pool_size=2000)
    full, resumed = _full_and_resumed(tmp_path, config, interrupt, at_step=17)
    assert len(resumed.losses) == 30
    assert resumed.final_loss == pytest.approx(full.final_loss, rel=1e-5)
    assert resumed.losses == pytest.approx(full.losses, rel=1e-5)
    assert resumed.record["train_model_evals"] == full.record["train_model_evals"]


def test_fresh_noise_with_validation_keeps_the_best_weights_and_resumes(tmp_path):
    config = small_config(steps=40, checkpoint_every=10, n_data=300, fresh_noise=True, eta=0.0, val_fraction=0.25)
    full, resumed = _full_and_resumed(tmp_path, config, KeyboardInterrupt, at_step=25)
    curve = full.record["held_out_curve"]
    assert [step for step, _ in curve] == [10, 20, 30, 40]
    best_step, best = min(curve, key=lambda item: item[1])
    assert full.record["best_step"] == best_step and full.record["held_out_loss"] == pytest.approx(best)
    assert full.record["pool_size"] == 0  # no fixed pool: every minibatch is noised afresh
    # the shipped weights are the best ones: their held-out loss is the recorded one
    from safetensors.torch import load_file

    shipped = load_file(str(tmp_path / "full" / "guidance.safetensors"))
    checkpoint = load_file(str(tmp_path / "full" / "checkpoint.safetensors"))
    for key, value in shipped.items():
        torch.testing.assert_close(value, checkpoint[f"best.{key}"] if f"best.{key}" in checkpoint
                                   else checkpoint[f"net.{key}"])
    assert resumed.losses == pytest.approx(full.losses, rel=1e-5)
    assert [s for s, _ in resumed.record["held_out_curve"]] == [s for s, _ in curve]
    assert [v for _, v in resumed.record["held_out_curve"]] == pytest.approx([v for _, v in curve], rel=1e-5)
    assert resumed.record["best_step"] == full.record["best_step"]


def test_the_weights_kept_are_the_best_held_out_not_the_last(tmp_path, monkeypatch):
    import tiltgen.tilt.learned.train as train_module

    values = iter([3.0, 1.0, 2.0, 4.0])  # held-out loss at steps 10, 20, 30, 40: best at 20
    monkeypatch.setattr(train_module._Run, "held_out_loss", lambda self: next(values))
    snapshots = {}
    original = train_module._Run.validate

    def validate(self):
        snapshots[self.step] = {k: v.clone() for k, v in self.potential.net.state_dict().items()}
        original(self)

    monkeypatch.setattr(train_module._Run, "validate", validate)
    model, fam = ring_model("flow")
    config = small_config(steps=40, checkpoint_every=10, n_data=300, fresh_noise=True, eta=0.0, val_fraction=0.25)
    result = train_guidance(model, fam.schedule, RING.reward, config, shape=(2,), out_dir=tmp_path, progress=False)
    assert result.record["best_step"] == 20 and result.record["held_out_loss"] == 1.0
    from safetensors.torch import load_file

    shipped = load_file(str(tmp_path / "guidance.safetensors"))
    for key, value in shipped.items():
        torch.testing.assert_close(value, snapshots[20][key])
        torch.testing.assert_close(result.guidance.potential.net.state_dict()[key], snapshots[20][key])
    assert any(not torch.equal(shipped[k], snapshots[40][k]) for k in shipped)


def test_validation_split_holds_out_whole_conditions():
    from tiltgen.tilt.learned.data import split_rows

    prompt = torch.arange(10).repeat_interleave(4)
    train, held = split_rows(prompt, 0.2, seed=0)
    assert torch.unique(prompt[held]).numel() == 2 and held.numel() == 8
    assert not set(prompt[train].tolist()) & set(prompt[held].tolist())
    assert sorted(train.tolist() + held.tolist()) == list(range(40))
    one = torch.zeros(20, dtype=torch.long)  # a single condition: samples are held out instead
    train, held = split_rows(one, 0.25, seed=0)
    assert held.numel() == 5 and train.numel() == 15
    assert split_rows(prompt, 0.0, seed=0)[1].numel() == 0


def test_data_reuse_skips_generation_and_refuses_other_data_settings(tmp_path, monkeypatch):
    import tiltgen.tilt.learned.train as train_module

    model, fam = ring_model("flow")
    first = train_guidance(model, fam.schedule, RING.reward, small_config(steps=5), shape=(2,),
                           out_dir=tmp_path / "a", progress=False)

    def no_sampling(*args, **kwargs):
        raise AssertionError("data was generated again")

    monkeypatch.setattr(train_module, "generate_data", no_sampling)
    # other training settings (lr, a validation split) reuse the samples and rewards
    again = train_guidance(model, fam.schedule, RING.reward, small_config(steps=5, lr=1e-3, val_fraction=0.2),
                           shape=(2,), out_dir=tmp_path / "b", data_from=tmp_path / "a", progress=False)
    assert again.record["data_size"] == first.record["data_size"]
    assert again.record["data"]["wall_s"] >= first.record["data"]["wall_s"] * 0.5
    with pytest.raises(TiltgenError, match="train.n_data"):
        train_guidance(model, fam.schedule, RING.reward, small_config(steps=5, n_data=100), shape=(2,),
                       out_dir=tmp_path / "c", data_from=tmp_path / "a", progress=False)
    with pytest.raises(TiltgenError, match="no config.json"):
        train_guidance(model, fam.schedule, RING.reward, small_config(steps=5), shape=(2,),
                       out_dir=tmp_path / "d", data_from=tmp_path / "missing", progress=False)
    with pytest.raises(TiltgenError, match="fresh_noise"):
        small_config(fresh_noise=True, eta=1.0)
    with pytest.raises(TiltgenError, match="val_fraction"):
        small_config(val_fraction=1.0)


def test_bad_inputs_raise_clear_errors(tmp_path):
    model, fam = ring_model("flow")
    with pytest.raises(TiltgenError, match="beta"):
        small_config(beta=0.0)
    with pytest.raises(TiltgenError, match="cannot resume"):
        train_guidance(model, fam.schedule, RING.reward, small_config(), shape=(2,), out_dir=tmp_path / "none",
                       resume=True, progress=False)
    with pytest.raises(TiltgenError, match="dimension"):
        train_guidance(model, fam.schedule, RING.reward, small_config(), shape=(3,), progress=False)
    bad = as_reward(lambda x0: torch.where(x0[:, 0] > 3, float("nan"), 0.0), differentiable=False, name="nanny")
    with pytest.raises(TiltgenError, match="non-finite"):
        train_guidance(model, fam.schedule, bad, small_config(), shape=(2,), progress=False)
    with pytest.raises(TiltgenError, match="loss"):
        small_config(loss="hinge")


# --- CLI and bench ----------------------------------------------------------------------------
def test_cli_train_guidance_writes_record_and_reloads(tmp_path, capsys):
    out = tmp_path / "g"
    args = ["train-guidance", "--case", "ring2d-linear-b2", "--family", "flow", "--out", str(out), "--steps", "20",
            "--n-data", "200", "--pool-size", "2000", "--data-steps", "8", "--time-levels", "8", "--no-progress"]
    assert main(args) == 0
    record = json.loads((out / "guidance.json").read_text())
    for key in ("beta", "reward", "model", "data_size", "train_model_evals", "train_reward_evals", "train_wall_s"):
        assert key in record
    assert record["beta"] == 2.0 and record["reward"] == "linear-x" and record["data_size"] == 200
    assert record["data"]["flops_per_sample"] > 0 and record["data"]["flops"] == 200 * record["data"]["flops_per_sample"]
    assert record["train_flops_per_step"] > 0 and record["train_flops"] == record["steps"] * record["train_flops_per_step"]
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    guidance = load_guidance(out)
    x = torch.randn(4, 2, dtype=torch.float64)
    assert guidance(x, torch.full((4,), 0.5, dtype=torch.float64), None, x).x0_shift.shape == (4, 2)
    assert main(args) == 2  # a non-empty output directory without --resume
    assert "--resume" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0  # already finished: resumes at the last step


def test_bench_method_reports_training_compute():
    from tiltgen.eval.analytic_bench import BenchSettings, run_analytic_bench

    settings = BenchSettings(n=200, steps=8, train_steps=40, train_data=200, train_pool=2000)
    result = run_analytic_bench(["ring2d-linear-b2"], ["flow"], ["learned"], settings, progress=False)
    rec = result.records[-1]
    assert rec["method"] == "learned" and rec["reward_grad_evals"] == 0
    assert rec["train_model_evals"] > 0 and rec["train_reward_evals"] == 200 and rec["train_wall_s"] > 0


def test_conditions_are_normalised_and_embedded_per_prompt():
    # reward +x for condition +1 and -x for -1: one network must steer both ways
    model, fam = ring_model("flow")
    reward = as_reward(lambda x0, cond: cond * x0[:, 0], differentiable=False, name="signed-x")
    encoder = lambda cond: torch.tensor([[float(cond)]])  # noqa: E731
    config = small_config(n_data=400, pool_size=6000, steps=150)
    result = train_guidance(model, fam.schedule, reward, config, shape=(2,), conditions=[1.0, -1.0],
                            cond_encoder=encoder, progress=False)
    guided = GuidedModel(model, fam.schedule, result.guidance)
    kwargs = dict(shape=(2,), seeds=range(300), steps=12, dtype=torch.float64, progress=False)
    right = sample(guided, fam.schedule, cond=1.0, **kwargs)[:, 0].mean()
    left = sample(guided, fam.schedule, cond=-1.0, **kwargs)[:, 0].mean()
    assert float(right) > 1.5 and float(left) < -1.5  # exact: +-2.9
    with pytest.raises(TiltgenError, match="cond_encoder"):
        train_guidance(model, fam.schedule, reward, config, shape=(2,), conditions=[1.0], progress=False)


def test_weights_ess_is_n_for_flat_rewards_and_one_for_a_dominant_sample():
    from tiltgen.tilt.learned.data import weights_ess

    prompt = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    reward = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.0, 0.0, 0.0, 100.0], dtype=torch.float64)
    ess = weights_ess(reward, prompt, beta=1.0)
    torch.testing.assert_close(ess, torch.tensor([4.0, 1.0], dtype=torch.float64))
    # two equal weights and two of weight e^-1: (2 + 2/e)^2 / (2 + 2/e^2)
    e = torch.exp(torch.tensor(-1.0, dtype=torch.float64))
    two = weights_ess(torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64), torch.zeros(4, dtype=torch.long), 1.0)
    torch.testing.assert_close(two, ((2 + 2 * e) ** 2 / (2 + 2 * e**2)).reshape(1))


def test_training_records_the_weights_ess_and_warns_when_it_is_tiny(tmp_path):
    model, fam = ring_model("flow")
    result = train_guidance(model, fam.schedule, RING.reward, small_config(steps=2, n_data=200), shape=(2,),
                            out_dir=tmp_path / "ok", progress=False)
    ess = result.record["weights_ess"]
    assert 10 < ess["min"] <= ess["median"] < 200 and ess["samples_per_condition"] == 200
    assert "effective samples of the tilt weights | min" in (tmp_path / "ok" / "README.md").read_text()
    steep = CASES["ring2d-farquad-b0.5"]
    with pytest.warns(UserWarning, match="effective sample size of .* raise n_data"):
        low = train_guidance(model, fam.schedule, steep.reward, small_config(steps=2, n_data=200, beta=steep.beta),
                             shape=(2,), progress=False)
    assert low.record["weights_ess"]["min"] < 10


def test_cli_shows_the_low_ess_warning_as_one_line(tmp_path, capsys):
    code = main(["train-guidance", "--case", "ring2d-farquad-b0.5", "--family", "flow", "--out", str(tmp_path / "g"),
                 "--steps", "2", "--n-data", "200", "--data-steps", "4", "--pool-size", "500", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0
    assert "tiltgen: warning: the exp(r/beta) weights of the training data have an effective sample size" in captured.err
    assert "UserWarning" not in captured.err and "main.py" not in captured.err
    assert "effective samples of the exp(r/beta) weights per condition: min" in captured.out
