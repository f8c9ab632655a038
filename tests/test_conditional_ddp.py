"""Class-conditional GAN, RealNVP, Glow, NSF, CVAE and CNF (MLP, conv and conv + MLP fields) under 2-rank gloo DDP on
labelled (x, y) batches: the ranks see disjoint shards with each image's own label, draw different noise, train the
class-specific weights and end identical."""

import sys
from pathlib import Path

import pytest
import torch
from subprocess_runs import python_env, run

PROBE = Path(__file__).with_name("cond_ddp_probe.py")
STEPS = 3
# Weights that only a labelled step trains (names containing these): the projection's class embedding, the flows'
# per-class base and label projections in their coupling networks, the label's input channels of the CVAE encoder
# and the label's inputs of its decoder (both in these first layers), the CNF's per-class field shifts and base.
FLOW_CLASS_WEIGHTS = ["flow.base.loc", "flow.base.log_scale", ".conditioner.context."]
CLASS_WEIGHTS = {"cnf": ["field.class_shifts.", "class_base."], "cnf_conv": ["field.class_shifts.", "class_base."],
                 "cnf_conv_mlp": ["field.conv.class_shifts.", "field.mlp.class_shifts.", "class_base."],
                 "gan": ["class_projection."], "glow": FLOW_CLASS_WEIGHTS, "nsf": FLOW_CLASS_WEIGHTS,
                 "realnvp": FLOW_CLASS_WEIGHTS, "vae": ["encoder.features.0.", "decoder.project.0."]}


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("cond_ddp")
    result = run([sys.executable, str(PROBE), str(out), str(STEPS)], timeout=400, env=python_env())
    assert result.returncode == 0, result.stderr[-4000:]
    return out


@pytest.mark.timeout(450)
@pytest.mark.parametrize("family", sorted(CLASS_WEIGHTS))
def test_conditional_family_on_two_cpu_ranks_shards_labelled_batches_and_ends_identical(ddp_runs, family):
    rank0, rank1 = (torch.load(ddp_runs / f"{family}_rank{r}.pt", weights_only=True) for r in (0, 1))
    steps_per_batch = 2 if family == "gan" else 1
    assert rank0["world_size"] == 2 and rank0["global_step"] == rank1["global_step"] == steps_per_batch * STEPS
    # Disjoint shards, and every image arrived with its own label (the probe's dataset, regenerated here).
    data = torch.Generator().manual_seed(1)
    x = torch.rand(256, 1, 8, 8, generator=data) * 2 - 1
    y = torch.randint(10, (256,), generator=data)
    label_of = {tuple(img.flatten().tolist()): int(lab) for img, lab in zip(x, y)}
    seen = []
    for rank in (rank0, rank1):
        pairs = [(tuple(img.flatten().tolist()), int(lab))
                 for img, lab in zip(rank["images"].flatten(0, 1), rank["labels"].flatten())]
        assert all(label_of[img] == lab for img, lab in pairs)
        seen.append({img for img, _ in pairs})
    assert len(seen[0]) == len(seen[1]) == STEPS * 16 and not seen[0] & seen[1]
    assert (rank0["noise"] != rank1["noise"]).all()  # per-rank noise
    for name, value in rank0["state_dict"].items():  # identical replicas, buffers included
        assert torch.equal(value, rank1["state_dict"][name]), name
    for prefix in CLASS_WEIGHTS[family]:
        moved = [k for k, v in rank0["init"].items()
                 if prefix in k and v.is_floating_point() and not torch.equal(v, rank0["state_dict"][k])]
        assert moved, f"nothing named *{prefix}* was trained"


@pytest.mark.timeout(450)
@pytest.mark.parametrize("family", ["cnf", "cnf_conv", "cnf_conv_mlp"])
def test_conditional_cnf_exact_likelihood_on_two_ranks_equals_one_process_and_the_brute_force_trace(ddp_runs, family):
    """Each rank's exact log p(x | y) of its share (the conv fields through their coloured traces) equals one process's
    on the trained weights, and the conv fields' equal the uncoloured trace's (one VJP per coordinate)."""
    from cond_ddp_probe import FAMILIES, LIKELIHOOD_EXAMPLES

    rank0, rank1 = (torch.load(ddp_runs / f"{family}_rank{r}.pt", weights_only=True) for r in (0, 1))
    data = torch.Generator().manual_seed(1)
    x = (torch.rand(256, 1, 8, 8, generator=data) * 2 - 1)[:LIKELIHOOD_EXAMPLES]
    y = torch.randint(10, (256,), generator=data)[:LIKELIHOOD_EXAMPLES]
    gathered = torch.empty(LIKELIHOOD_EXAMPLES)
    gathered[0::2], gathered[1::2] = rank0["exact_log_prob"], rank1["exact_log_prob"]
    model = FAMILIES[family]()
    model.load_state_dict(rank0["state_dict"])
    model.eval()
    with torch.no_grad():
        single = model.log_prob(x, y)
        assert torch.allclose(gathered, single, rtol=1e-5, atol=1e-4)
        colouring = getattr(model.field, "divergence_colouring", None)
        if family == "cnf_conv":
            assert colouring is not None and int(colouring((1, 8, 8)).max()) + 1 < 64  # the trace is coloured
            model.field.divergence_colouring = None  # AugmentedDynamics then takes one VJP per coordinate
            assert torch.allclose(model.log_prob(x, y), single, rtol=1e-5, atol=1e-4)
        if family == "cnf_conv_mlp":  # the conv part's coloured passes plus the MLP's closed form
            assert int(model.field.conv.divergence_colouring((1, 8, 8)).max()) + 1 < 64
            model.field.conv.divergence_colouring = lambda shape: None  # one VJP per coordinate for the conv part
            assert torch.allclose(model.log_prob(x, y), single, rtol=1e-5, atol=1e-4)

