"""TarFlow: exact log-density against a brute-force Jacobian, invertibility, the key/value cache, causality,
the denoising step and its NFE, guidance, labels and errors, and the CLI round trip."""

import glob
import math
from pathlib import Path

import pytest
import torch

from lightning_flows.cli import main
from lightning_flows.models import TarFlow
from lightning_flows.models.tarflow import AutoregressiveBlock, Patches, TarFlowNetwork
from lightning_flows.nn.transformer import CausalTransformer

TINY = dict(patch_size=2, blocks=3, layers=1, width=16, heads=2)


def randomised(model: TarFlow, std: float = 0.3) -> TarFlow:
    """The output heads start at zero (every block the identity): give them weights, so the tests see real maps."""
    torch.manual_seed(1)
    for block in model.blocks:
        torch.nn.init.normal_(block.head.weight, std=std)
        torch.nn.init.normal_(block.head.bias, std=std)
    return model


def tiny(shape=(1, 4, 4), num_classes=0, sigma=0.1, preprocess="none", **network) -> TarFlow:
    torch.manual_seed(0)
    return randomised(TarFlow(shape, network={**TINY, **network}, noise={"sigma": sigma}, num_classes=num_classes,
                              preprocess=preprocess))


def brute_force_log_prob(model: TarFlow, x: torch.Tensor, labels=None) -> torch.Tensor:
    """``log N(f(x); 0, I) + log|det df/dx|`` with the full Jacobian of the normalizing map, example by example."""
    values = []
    for i in range(x.shape[0]):
        label = None if labels is None else labels[i:i + 1]
        flat = lambda v, label=label: model.to_noise(v[None], label)[0].flatten()  # noqa: E731
        jacobian = torch.autograd.functional.jacobian(flat, x[i]).reshape(x[i].numel(), x[i].numel())
        z = flat(x[i])
        log_normal = -0.5 * z.pow(2).sum() - 0.5 * z.numel() * math.log(2 * math.pi)
        values.append(log_normal + torch.linalg.slogdet(jacobian)[1])
    return torch.stack(values)


@pytest.mark.parametrize("shape, network", [((1, 4, 4), {}), ((2, 4, 4), {"patch_size": 1}), ((4,), {"patch_size": 1}),
                                            ((6,), {"patch_size": 2})])
def test_exact_log_prob_equals_the_brute_force_jacobian(shape, network):
    model = tiny(shape, **network).double()
    x = torch.randn(3, *shape, dtype=torch.double)
    torch.testing.assert_close(model.log_prob(x), brute_force_log_prob(model, x), rtol=1e-9, atol=1e-9)


def test_with_the_logit_preprocessing_log_prob_is_still_the_exact_density_in_model_space():
    model = tiny((1, 4, 4), preprocess="logit").double()
    x = torch.rand(3, 1, 4, 4, dtype=torch.double) * 1.8 - 0.9
    torch.testing.assert_close(model.log_prob(x), brute_force_log_prob(model, x), rtol=1e-9, atol=1e-9)
    # A noise-augmented point is made in logit space; its density is the model-space density at its image.
    y = model.to_flow_space(x)[0] + 0.3 * torch.randn_like(x)
    torch.testing.assert_close(model.flow_space_log_det(y), model.to_flow_space(model.from_flow_space(y))[1])
    torch.testing.assert_close(model.flow_log_density(y) + model.flow_space_log_det(y),
                               model.log_prob(model.from_flow_space(y)))
    assert torch.isfinite(model.flow_space_log_det(torch.full((1, 1, 4, 4), 80.0, dtype=torch.double))).all()


def test_conditional_log_prob_equals_the_brute_force_jacobian_of_each_class():
    model = randomised(tiny(num_classes=3)).double()
    torch.nn.init.normal_(model.blocks[0].class_embed.embed.weight, std=1.0)
    x, y = torch.randn(3, 1, 4, 4, dtype=torch.double), torch.tensor([0, 2, 1])
    exact = model.log_prob(x, y)
    torch.testing.assert_close(exact, brute_force_log_prob(model, x, y), rtol=1e-9, atol=1e-9)
    assert not torch.allclose(exact, model.log_prob(x, torch.tensor([1, 0, 2])))  # the label matters


@pytest.mark.parametrize("shape, network", [((1, 8, 8), {}), ((3, 4, 4), {"patch_size": 1}), ((2,), {"patch_size": 1}),
                                            ((1, 4, 4), {"preprocess": "logit"})])
def test_inverse_inverts_the_flow_to_1e_5(shape, network):
    # Head weights of std 0.1 already send N(0, 1) inputs to |z| up to ~20; stronger random maps amplify float32
    # rounding through the sequential inverse (as any deep autoregressive flow does), not a flaw of the inverse.
    model = randomised(tiny(shape, **network), std=0.1)
    x = torch.rand(16, *shape) * 1.8 - 0.9
    z, _ = model.to_noise(x)
    assert (model.invert(z) - x).abs().max() < 1e-5
    zz = torch.randn_like(z)
    assert (model.to_noise(model.invert(zz))[0] - zz).abs().max() < 1e-5


def test_kv_cached_inversion_equals_uncached_sequential_inversion_also_guided():
    model = randomised(tiny((1, 8, 8), num_classes=4), std=0.1)
    for block in model.blocks:
        torch.nn.init.normal_(block.class_embed.embed.weight, std=1.0)
    z = torch.randn(5, model.patches.tokens, model.patches.token_dim)
    labels = torch.tensor([0, 1, 2, 3, 0])
    for guidance in (1.0, 2.5):
        cached = model.invert(z, labels, guidance, cached=True)
        uncached = model.invert(z, labels, guidance, cached=False)
        torch.testing.assert_close(cached, uncached, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(model.invert(z, labels, 2.5), model.invert(z, labels, 1.0))


def test_the_transformer_cache_gives_the_parallel_outputs_for_chunks_of_any_length():
    torch.manual_seed(0)
    net = CausalTransformer(width=8, depth=2, heads=2)
    h = torch.randn(2, 7, 8)
    cache = net.new_cache(2, 7, like=h)
    chunks = [net(h[:, :3], cache), net(h[:, 3:4], cache), net(h[:, 4:], cache)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), net(h), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cache holds 7 positions"):
        net(h[:, :1], cache)


@pytest.mark.parametrize("reverse", [False, True])
def test_a_block_is_causal_in_its_order(reverse):
    torch.manual_seed(0)
    block = AutoregressiveBlock(tokens=6, token_dim=3, network=TarFlowNetwork(**TINY), reverse=reverse)
    torch.nn.init.normal_(block.head.weight, std=0.3)
    x = torch.randn(2, 6, 3)
    z, _ = block(x)
    order = list(range(6))[::-1] if reverse else list(range(6))
    for position in range(6):
        changed = x.clone()
        changed[:, order[position:]] += torch.randn(2, 6 - position, 3)  # tokens at and after `position`
        z_changed, _ = block(changed)
        # Every output before `position` (in the block's order) is unchanged; the one at `position` does change.
        assert torch.equal(z[:, order[:position]], z_changed[:, order[:position]]), position
        assert not torch.allclose(z[:, order[position]], z_changed[:, order[position]])
        # ...but its affine parameters do not: token i's (mu, alpha) depend on the tokens before i only.
        mu, alpha = block.conditioner(x[:, order])
        mu_c, alpha_c = block.conditioner(changed[:, order])
        assert torch.equal(mu[:, :position + 1], mu_c[:, :position + 1])
        assert torch.equal(alpha[:, :position + 1], alpha_c[:, :position + 1])


def test_consecutive_blocks_read_the_tokens_in_opposite_orders_and_start_as_the_identity():
    model = TarFlow((1, 4, 4), network=TINY)
    assert [block.reverse for block in model.blocks] == [False, True, False]
    x = torch.randn(3, 1, 4, 4)
    z, log_det = model.to_noise(x)
    assert torch.equal(model.patches.to_data(z), x) and torch.equal(log_det, torch.zeros(3))


def test_patches_round_trip_and_keep_each_patch_together():
    patches = Patches((2, 4, 6), patch_size=2)
    x = torch.arange(48.0).reshape(1, 2, 4, 6)
    tokens = patches.to_tokens(x)
    assert tokens.shape == (1, 6, 8) and torch.equal(patches.to_data(tokens), x)
    # The first token: the top-left 2x2 of both channels.
    assert set(tokens[0, 0].tolist()) == {0.0, 1.0, 6.0, 7.0, 24.0, 25.0, 30.0, 31.0}
    with pytest.raises(ValueError, match="patch_size 3 must divide the image sides"):
        Patches((1, 8, 8), 3)
    with pytest.raises(ValueError, match="must divide the vector length"):
        TarFlow((3,), network={"patch_size": 2})


def test_sampling_counts_every_sequential_pass_and_the_denoising_step():
    model = tiny((1, 8, 8))
    assert model.sample(4).shape == (4, 1, 8, 8)
    assert model.last_sample_nfe == 3 * 16 + 1  # K blocks x T tokens, plus the denoising pass
    model.noise.denoise = False
    model.sample(4)
    assert model.last_sample_nfe == 3 * 16


def test_the_denoising_step_is_tweedies_formula_on_a_standard_normal_flow():
    # A fresh flow is the identity: p = N(0, I), score -x, so the step maps x to (1 - sigma^2) x.
    model = TarFlow((2,), network={"patch_size": 1, "blocks": 2, "layers": 1, "width": 8, "heads": 2},
                    noise={"sigma": 0.3})
    torch.manual_seed(5)
    denoised = model.sample(6)
    torch.manual_seed(5)
    raw = torch.randn(6, 2, 1).reshape(6, 2)
    torch.testing.assert_close(denoised, (1 - 0.3 ** 2) * raw)


def test_sampling_inside_inference_mode_takes_the_score_with_autograd():
    model = tiny((4,), patch_size=1)
    torch.manual_seed(0)
    with torch.inference_mode():
        inside = model.sample(5)
    torch.manual_seed(0)
    outside = model.sample(5)
    torch.testing.assert_close(inside, outside)


def test_guidance_one_is_the_conditional_flow_and_unconditional_models_refuse_labels():
    model = tiny((1, 4, 4), num_classes=3)
    y = torch.tensor([0, 1, 2])
    torch.manual_seed(0)
    plain = model.sample(3, y)
    torch.manual_seed(0)
    assert torch.equal(model.sample(3, y, guidance=1.0), plain)
    assert model.last_sample_nfe == 3 * 4 + 1
    with pytest.raises(ValueError, match="unconditional"):
        tiny((1, 4, 4)).sample(2, guidance=2.0)
    with pytest.raises(ValueError, match="labels must lie in"):
        model.log_prob(torch.randn(1, 1, 4, 4), torch.tensor([3]))


def test_likelihoods_are_labelled_exact_of_the_data_and_exact_of_the_noisy_data():
    model = tiny((4,), patch_size=1, sigma=0.2)
    estimators = model.likelihood_estimators()
    assert set(estimators) == {"exact", "exact_noisy"}
    x = torch.randn(7, 4)
    torch.manual_seed(3)
    noisy = estimators["exact_noisy"](x)
    torch.manual_seed(3)
    torch.testing.assert_close(noisy, model.log_prob(x + 0.2 * torch.randn_like(x)))
    assert set(tiny((4,), patch_size=1, sigma=0.0).likelihood_estimators()) == {"exact"}


def test_the_training_loss_is_the_noisy_examples_nll_per_dimension():
    model = tiny((4,), patch_size=1, sigma=0.2)
    x = torch.randn(8, 4)
    torch.manual_seed(2)
    loss = model.training_loss(x)
    torch.manual_seed(2)
    torch.testing.assert_close(loss, -model.log_prob(x + 0.2 * torch.randn_like(x)).mean() / 4)


def test_options_come_as_dicts_and_bad_ones_name_the_fix():
    with pytest.raises(ValueError, match="Unknown network option"):
        TarFlow((2,), network={"patch": 1})
    with pytest.raises(ValueError, match="divisible by heads"):
        TarFlow((2,), network={"patch_size": 1, "width": 10, "heads": 4})
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        TarFlow((2,), noise={"sigma": -1.0})


def test_cli_fit_checkpoint_and_sample_round_trip(tmp_path, tiny_fit):
    cli = tiny_fit("experiments/digits/tarflow.yaml", tmp_path, "--model.init_args.network.width", "16",
                   "--model.init_args.network.blocks", "2", "--model.init_args.network.layers", "1")
    assert cli.model.hparams["network"]["width"] == 16  # stored as plain data
    (checkpoint,) = glob.glob(f"{tmp_path}/**/checkpoints/last.ckpt", recursive=True)
    out = tmp_path / "grid.png"
    main(["sample", "--ckpt", checkpoint, "--n", "8", "--out", str(out)])
    assert Path(out).stat().st_size > 200
    from lightning_flows.checkpoints import load_model_and_data

    loaded, _ = load_model_and_data(checkpoint)
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    torch.testing.assert_close(loaded.log_prob(x), cli.model.cpu().eval().log_prob(x))


def test_the_transformer_docstring_example_runs():
    import doctest

    import lightning_flows.nn.transformer as module

    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
