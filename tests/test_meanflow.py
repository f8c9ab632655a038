"""MeanFlow: the JVP target against finite differences and against a closed-form Gaussian mean flow, the reduction
to flow matching at r = t, the adaptive weight, NFE of few-step sampling, the instantaneous-field likelihood against
the closed form, folded guidance, the two-time backbones, and the CLI round trip."""

import glob
import math

import pytest
import torch
from torch import nn

from lightning_flows.cli import main
from lightning_flows.flow_matching import AdaptiveWeighting, MeanFlowTimes, adaptive_loss, mean_flow_target
from lightning_flows.models import MeanFlow
from lightning_flows.nn import TimeMLP, TimeUNet
from lightning_flows.ode import SolverConfig

MEAN, STD = torch.tensor([1.5, -0.5]), 0.3  # the Gaussian data N(MEAN, STD^2 I) of the closed-form tests


class GaussianMeanVelocity(nn.Module):
    """The exact average velocity of flow matching's independent linear path to ``N(MEAN, STD^2 I)`` data.

    With ``x0 ~ N(0, I)``, ``z_t = t m + sigma_t xi`` where ``sigma_t^2 = (1 - t)^2 + t^2 s^2``, so the flow maps
    ``z_a`` to ``z_b = b m + (sigma_b / sigma_a)(z_a - a m)``: ``u(z, a, b) = (z_b - z) / (b - a)``, and at ``b = a``
    the velocity ``v(z, a) = m + (sigma_a' / sigma_a)(z - a m)`` with ``sigma_a' = (s^2 a - (1 - a)) / sigma_a``.
    Called like a two-time backbone: ``forward(z, t, y, interval)``.
    """

    def forward(self, z, t, y=None, interval=None):
        a = torch.as_tensor(t, dtype=z.dtype).expand(z.shape[0])[:, None]
        h = torch.as_tensor(interval, dtype=z.dtype).expand(z.shape[0])[:, None]
        b, m = a + h, MEAN.to(z.dtype)
        sigma = lambda t_: torch.sqrt((1 - t_) ** 2 + t_ ** 2 * STD ** 2)  # noqa: E731
        velocity = m + (STD ** 2 * a - (1 - a)) / sigma(a) ** 2 * (z - a * m)
        safe = torch.where(h > 1e-9, h, torch.ones_like(h))
        jump = (b * m + sigma(b) / sigma(a) * (z - a * m) - z) / safe
        return torch.where(h > 1e-9, jump, velocity)


def gaussian_meanflow(**kwargs) -> MeanFlow:
    model = MeanFlow((2,), backbone={"kind": "mlp", "hidden": 8, "depth": 1}, **kwargs)
    model.velocity = GaussianMeanVelocity()
    return model


def test_the_meanflow_identity_holds_for_the_closed_form_mean_velocity():
    """``u = v + (b - a) d/da u`` along the flow: the JVP target of the true mean velocity is that velocity."""
    torch.manual_seed(0)
    u = GaussianMeanVelocity()
    z, a = torch.randn(64, 2, dtype=torch.double), torch.rand(64, dtype=torch.double)
    b = a + (1 - a) * torch.rand(64, dtype=torch.double)
    velocity = u(z, a, interval=torch.zeros_like(a))
    prediction, target = mean_flow_target(lambda z_, a_, b_: u(z_, a_, interval=b_ - a_), z, a, b, velocity)
    torch.testing.assert_close(target, prediction, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(prediction, u(z, a, interval=b - a))
    # A wrong sign of the interval term breaks it (what this test guards).
    du = (target - velocity) / (b - a)[:, None]
    assert (velocity - (b - a)[:, None] * du - prediction).abs().max() > 1e-2


@pytest.mark.parametrize("tangent", ["path", "model"])
def test_the_jvp_target_equals_a_finite_difference_derivative_along_the_flow(tangent):
    """d/da u(z_a, a, b) with z moving along the tangent: the path's v (the paper) or, with jvp_tangent: model, the
    network's own u(z, a, a); the target's v is the path's either way."""
    torch.manual_seed(0)
    net = TimeMLP(3, hidden=16, depth=2, interval_time=True).double()
    u = lambda z, a, b: net(z, a, interval=b - a)  # noqa: E731
    z, v = torch.randn(8, 3, dtype=torch.double), torch.randn(8, 3, dtype=torch.double)
    a = torch.rand(8, dtype=torch.double) * 0.5
    b = a + 0.4
    w = v if tangent == "path" else u(z, a, a).detach()
    _, target = mean_flow_target(u, z, a, b, v, tangent=None if tangent == "path" else w)
    eps = 1e-6  # central differences
    finite = (u(z + eps * w, a + eps, b) - u(z - eps * w, a - eps, b)) / (2 * eps)
    torch.testing.assert_close(target, v + (b - a)[:, None] * finite, rtol=1e-6, atol=1e-7)


def test_the_model_tangent_targets_the_closed_form_mean_flow_exactly():
    """For the closed-form mean flow, whose instantaneous field is the marginal velocity, the target with the model's
    own tangent is exactly the prediction, as the paper's is."""
    model = gaussian_meanflow(jvp_tangent="model").double()
    x1 = torch.randn(64, 2, dtype=torch.double)
    exact = model.velocity
    torch.manual_seed(1)
    x0, a = torch.randn_like(x1), torch.rand(64, dtype=torch.double)
    b = a + (1 - a) * torch.rand(64, dtype=torch.double)
    z = (1 - a)[:, None] * x0 + a[:, None] * x1
    marginal = exact(z, a, interval=torch.zeros_like(a))
    prediction, target = mean_flow_target(lambda z_, a_, b_: exact(z_, a_, interval=b_ - a_), z, a, b, marginal,
                                          tangent=model.instantaneous_velocity(z, a))
    torch.testing.assert_close(target, prediction, rtol=1e-10, atol=1e-10)


def test_the_model_tangent_costs_one_more_forward_and_trains():
    calls = {"path": [], "model": []}
    for tangent in calls:
        torch.manual_seed(0)
        model = MeanFlow((2,), backbone={"kind": "mlp", "hidden": 8, "depth": 1}, jvp_tangent=tangent)
        model.velocity.register_forward_hook(lambda *_, kind=tangent: calls[kind].append(1))
        loss = model.training_loss(torch.randn(16, 2))
        loss.backward()
        assert torch.isfinite(loss)
        assert all(p.grad is not None for p in model.velocity.parameters() if p.requires_grad)
    assert len(calls["model"]) == len(calls["path"]) + 1
    with pytest.raises(ValueError, match="Unknown jvp_tangent 'teacher'"):
        MeanFlow((2,), jvp_tangent="teacher")


def test_the_batch_target_velocity_aims_at_the_marginal_velocity_and_leaves_r_equal_t_alone():
    """target_velocity: batch. On Gaussian data the closed-form mean flow is the exact answer, so its loss measures
    the target's noise alone: with the batch posterior's v for the intervals it is a small fraction of the one-pair
    v's; pairs with b = a keep flow matching's x1 - x0, so with every pair at r = t the two objectives are one."""
    x1 = (MEAN + STD * torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))).double()
    losses = {}
    for target in ("path", "batch"):
        model = gaussian_meanflow(jvp_tangent="model", target_velocity=target, times={"equal_share": 0.0},
                                  loss={"power": 0.0}).double()
        torch.manual_seed(2)
        losses[target] = float(model.training_loss(x1))
    assert losses["batch"] < 0.05 * losses["path"], losses
    equal = {}
    for target in ("path", "batch"):
        model = MeanFlow((2,), backbone={"kind": "mlp", "hidden": 8, "depth": 1}, times={"equal_share": 1.0},
                         target_velocity=target)
        torch.manual_seed(0)
        model.velocity.load_state_dict(MeanFlow((2,), backbone={"kind": "mlp", "hidden": 8, "depth": 1}).velocity
                                       .state_dict())
        torch.manual_seed(3)
        equal[target] = model.training_loss(x1.float())
    torch.testing.assert_close(equal["batch"], equal["path"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="Unknown target_velocity 'teacher'"):
        MeanFlow((2,), target_velocity="teacher")


def test_with_r_equal_t_the_loss_and_its_gradient_are_flow_matchings():
    model = MeanFlow((2,), backbone={"kind": "mlp", "hidden": 16, "depth": 2}, times={"equal_share": 1.0},
                      loss={"power": 0.0})
    x1 = torch.randn(32, 2)
    torch.manual_seed(4)
    loss = model.training_loss(x1)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.manual_seed(4)
    x0 = torch.randn_like(x1)
    a, b = model.times(32)
    assert torch.equal(a, b)
    xt = (1 - a[:, None]) * x0 + a[:, None] * x1
    fm_loss = (model.instantaneous_velocity(xt, a) - (x1 - x0)).pow(2).mean()  # FlowMatching.regression_loss
    torch.testing.assert_close(loss, fm_loss)
    for grad, fm_grad in zip(grads, torch.autograd.grad(fm_loss, list(model.parameters()))):
        torch.testing.assert_close(grad, fm_grad)


def test_time_pairs_are_ordered_with_the_configured_share_of_equal_ones():
    generator = torch.Generator().manual_seed(0)
    a, b = MeanFlowTimes(equal_share=0.75)(20_000, generator)
    assert (a <= b).all() and (a >= 0).all() and (b <= 1).all()
    assert abs((a == b).float().mean().item() - 0.75) < 0.02
    a, b = MeanFlowTimes(distribution="uniform", equal_share=0.0)(20_000, generator)
    assert (a < b).all() and abs(b.mean().item() - 2 / 3) < 0.01  # the larger of two uniforms
    with pytest.raises(ValueError, match="equal_share"):
        MeanFlowTimes(equal_share=1.5)


def test_the_adaptive_weight_is_a_stop_gradient_weight_on_the_squared_error():
    prediction = torch.tensor([[1.0, 2.0], [0.0, 0.5]], requires_grad=True)
    target = torch.zeros(2, 2)
    weighting = AdaptiveWeighting(power=1.0, eps=0.01)
    loss = adaptive_loss(prediction, target, weighting)
    error = torch.tensor([5.0, 0.25])
    weight = 1 / (error + 0.01)
    torch.testing.assert_close(loss, (weight * error).mean() / 2)
    (grad,) = torch.autograd.grad(loss, prediction)
    torch.testing.assert_close(grad, (weight[:, None] * 2 * prediction / 4).detach())  # the weight gets no gradient
    torch.testing.assert_close(adaptive_loss(prediction, target, AdaptiveWeighting(power=0.0)),
                               (prediction - target).pow(2).mean())


def test_one_step_sampling_of_the_closed_form_mean_flow_is_exact_and_costs_one_evaluation():
    model = gaussian_meanflow()
    calls = []
    model.velocity.register_forward_hook(lambda *args: calls.append(1))
    torch.manual_seed(0)
    x = model.sample(500)
    torch.manual_seed(0)
    z0 = torch.randn(500, 2)
    torch.testing.assert_close(x, MEAN + STD * z0)  # z_1 = m + s z_0: N(m, s^2 I) exactly, in one jump
    assert model.last_sample_nfe == 1 and len(calls) == 1
    x2 = model.sample(500, steps=2)
    assert model.last_sample_nfe == 2 and len(calls) == 3
    torch.manual_seed(1)
    three_jumps = model.sample(10, steps=3)
    torch.manual_seed(1)
    torch.testing.assert_close(three_jumps, MEAN + STD * torch.randn(10, 2), rtol=1e-5, atol=1e-5)
    assert x2.shape == (500, 2)


def test_the_likelihood_is_the_exact_ode_likelihood_of_the_instantaneous_field():
    model = gaussian_meanflow(likelihood_ode={"solver": {"method": "dopri5", "rtol": 1e-7, "atol": 1e-7}})
    assert model.likelihood_kind == "exact_instantaneous"
    x = MEAN + STD * torch.randn(16, 2)
    closed_form = (-0.5 * ((x - MEAN) / STD).pow(2) - math.log(STD) - 0.5 * math.log(2 * math.pi)).sum(1)
    torch.testing.assert_close(model.log_prob(x), closed_form, rtol=1e-4, atol=1e-4)
    assert set(model.likelihood_estimators()) == {"exact_instantaneous"}


def test_likelihood_kinds_say_whether_the_trace_is_exact():
    image = MeanFlow((1, 16, 16), backbone={"base_channels": 8, "channel_mults": [1, 2]})
    assert image.likelihood_kind == "estimate_instantaneous"  # 256 > exact_max_dim: Hutchinson
    forced = MeanFlow((2,), likelihood_ode={"divergence": "hutchinson"})
    assert forced.likelihood_kind == "estimate_instantaneous"


def test_guided_sampling_stays_one_evaluation_per_step_and_guidance_one_is_the_conditional_model():
    torch.manual_seed(0)
    model = MeanFlow((1, 8, 8), backbone={"base_channels": 8, "channel_mults": [1, 2]}, num_classes=3)
    calls = []
    model.velocity.register_forward_hook(lambda module, args, output: calls.append(output.shape[0]))
    y = torch.tensor([0, 1, 2, 0])
    torch.manual_seed(1)
    conditional = model.sample(4, y)
    torch.manual_seed(1)
    guided = model.sample(4, y, guidance=2.0)
    assert model.last_sample_nfe == 1 and calls == [4, 8]  # one call on the doubled batch
    torch.manual_seed(1)
    z = torch.randn(4, 1, 8, 8)
    u_c, u_null = model.average_velocity(z, 0.0, 1.0, y), model.average_velocity(z, 0.0, 1.0)
    torch.testing.assert_close(conditional, z + u_c)
    torch.testing.assert_close(guided, z + u_null + 2.0 * (u_c - u_null), rtol=1e-5, atol=1e-5)


def test_folded_guidance_targets_the_guided_velocity_for_kept_labels_only():
    torch.manual_seed(0)
    model = MeanFlow((2,), backbone={"kind": "mlp", "hidden": 16, "depth": 1}, num_classes=2,
                      guidance={"scale": 3.0, "mix": 0.5})
    z, a, v = torch.randn(4, 2), torch.rand(4), torch.randn(4, 2)
    labels = torch.tensor([0, 2, 1, 2])  # 2 = the null class (dropped)
    guided = model.guided_velocity(z, a, v, labels)
    u_c = model.instantaneous_velocity(z, a, torch.tensor([0, 0, 1, 1]))
    u_null = model.instantaneous_velocity(z, a)
    expected = 3.0 * v + 0.5 * u_c + (1 - 3.0 - 0.5) * u_null
    torch.testing.assert_close(guided[[0, 2]], expected[[0, 2]])
    torch.testing.assert_close(guided[[1, 3]], v[[1, 3]])
    plain = MeanFlow((2,), num_classes=2)
    assert plain.guided_velocity(z, a, v, labels) is v  # scale 1, mix 0: the plain conditional target


def test_folded_guidance_reuses_its_conditional_velocity_as_the_model_tangent(monkeypatch):
    # jvp_tangent: model needs u(z, a, a | labels), which folded guidance has just computed on the doubled batch:
    # the objective must be the one with the tangent evaluated on its own, at one network call fewer.
    torch.manual_seed(0)
    model = MeanFlow((2,), backbone={"kind": "mlp", "hidden": 16, "depth": 1}, num_classes=2,
                     guidance={"scale": 2.0, "mix": 0.3, "label_dropout": 0.5}, jvp_tangent="model",
                     loss={"power": 0.0}).double()  # squared error: the adaptive weight's loss is ~1 for any target
    with torch.no_grad():  # away from the initialisation, where the class embedding is zero (u(.|y) = u(.|null))
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    x, y = torch.randn(32, 2, dtype=torch.float64), torch.randint(2, (32,))
    calls = []
    forward = model.velocity.forward
    monkeypatch.setattr(model.velocity, "forward", lambda *args, **kwargs: calls.append(1) or forward(*args, **kwargs))
    torch.manual_seed(1)
    reused = model.training_loss(x, y)
    reused_calls = len(calls)
    guided_only = model._guided_velocity_and_own
    monkeypatch.setattr(model, "_guided_velocity_and_own", lambda *args: (guided_only(*args)[0], None))
    calls.clear()
    torch.manual_seed(1)
    separate = model.training_loss(x, y)
    assert len(calls) == reused_calls + 1
    torch.testing.assert_close(reused, separate)


def test_the_conditional_objective_trains_the_class_embedding():
    torch.manual_seed(0)
    model = MeanFlow((2,), backbone={"kind": "mlp", "hidden": 16, "depth": 1}, num_classes=2,
                      guidance={"scale": 2.0})
    loss = model.training_loss(torch.randn(16, 2), torch.randint(2, (16,)))
    loss.backward()
    assert model.velocity.mlp.class_embed.embed.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="labelled batches"):
        model.training_loss(torch.randn(4, 2))


@pytest.mark.parametrize("network", [lambda flag: TimeMLP(4, hidden=8, depth=2, interval_time=flag),
                                     lambda flag: TimeUNet((1, 8, 8), base_channels=8, channel_mults=(1, 2),
                                                           interval_time=flag)])
def test_the_second_time_input_leaves_the_one_time_backbones_unchanged(network):
    torch.manual_seed(0)
    one = network(False).state_dict()
    torch.manual_seed(0)
    two = network(True).state_dict()
    assert set(two) - set(one) and all(k.startswith("interval_embed.") for k in set(two) - set(one))
    for key, value in one.items():
        assert torch.equal(value, two[key]), key
    torch.manual_seed(0)
    with_interval = network(True)
    x = torch.randn(2, 4) if isinstance(with_interval, TimeMLP) else torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match="needs it"):
        with_interval(x, 0.5)
    with pytest.raises(ValueError, match="interval_time=True"):
        network(False)(x, 0.5, interval=0.1)
    assert not torch.allclose(with_interval(x, 0.5, interval=0.0), with_interval(x, 0.5, interval=0.5))


def test_options_come_as_dicts_and_bad_ones_name_the_fix():
    with pytest.raises(ValueError, match="Unknown sampling option"):
        MeanFlow((2,), sampling={"nfe": 1})
    with pytest.raises(ValueError, match="steps >= 1"):
        MeanFlow((2,), sampling={"steps": 0})
    model = MeanFlow((2,), likelihood_ode={"solver": {"method": "rk4", "steps": 4}})
    assert model.likelihood_ode.solver == SolverConfig("rk4", steps=4)
    assert model.hparams["likelihood_ode"]["solver"]["method"] == "rk4"  # checkpoints hold plain dicts


def test_cli_fit_checkpoint_and_sample_round_trip(tmp_path, tiny_fit):
    cli = tiny_fit("experiments/toy2d/meanflow.yaml", tmp_path, "--model.init_args.backbone.hidden", "16",
                   "--model.init_args.sampling.steps", "2")
    (checkpoint,) = glob.glob(f"{tmp_path}/**/checkpoints/last.ckpt", recursive=True)
    main(["sample", "--ckpt", checkpoint, "--n", "8", "--out", str(tmp_path / "x.png")])
    from lightning_flows.checkpoints import load_model_and_data

    loaded, _ = load_model_and_data(checkpoint)
    assert loaded.sampling.steps == 2
    torch.manual_seed(0)
    again = loaded.sample(8)
    torch.manual_seed(0)
    torch.testing.assert_close(again, cli.model.cpu().eval().sample(8))


def test_the_evaluator_also_scores_the_other_step_count_and_keeps_the_default_samples():
    """An exact mean flow maps noise to the same points in 1 or 2 jumps, so the 2-NFE energy distance the evaluator
    reports beside the 1-NFE one (MeanFlow's key limitation) equals it; the evaluated samples stay the default's."""
    from lightning_flows.data import GenerativeDataModule
    from lightning_flows.evaluation import EvaluationSpec, Evaluator

    dm = GenerativeDataModule("8gaussians")
    model = gaussian_meanflow()
    assert model.sampling_variants() == [{"steps": 2}]
    assert gaussian_meanflow(sampling={"steps": 2}).sampling_variants() == [{"steps": 1}]
    spec = dict(likelihood=False, n_samples=400, sample_batch_size=200, progress=False)
    evaluator = Evaluator(EvaluationSpec(**spec))
    result = evaluator.evaluate(model, dm)
    plain = Evaluator(EvaluationSpec(**spec, extras=False)).evaluate(model, dm)
    assert "energy_distance_nfe2" not in plain and result["nfe_per_sample"] == 1
    assert result["energy_distance"] == plain["energy_distance"]
    assert result["energy_distance_nfe2"] == pytest.approx(result["energy_distance"], abs=1e-5)
    assert evaluator.last_samples.shape == (400, 2) and model.sampling.steps == 1


def test_sampling_steps_sets_the_nfe_of_plain_sample_calls_inside_its_block_only():
    import doctest

    import lightning_flows.models.meanflow as module
    from lightning_flows.models.meanflow import sampling_steps

    model = gaussian_meanflow()
    with sampling_steps(model, 4) as same:
        assert same is model
        model.sample(5)
        assert model.last_sample_nfe == 4
        with pytest.raises(ValueError, match="steps >= 1"):
            with sampling_steps(model, 0):
                pass
        assert model.sampling.steps == 4
    model.sample(5)
    assert model.last_sample_nfe == 1
    assert doctest.testmod(module).failed == 0  # the docstring's example
