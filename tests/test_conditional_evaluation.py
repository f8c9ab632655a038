"""The evaluator on class-conditional models (issue 14): the feature classifier's accuracy on samples drawn for
each requested class, class-conditional FID/KID with real-vs-real floors, and DDP equal to one process."""

from __future__ import annotations


import pytest
import torch
from gloo_ranks import run_ranks
from torch import Tensor, nn

from lightning_flows.data import GenerativeDataModule
from lightning_flows.evaluation import EvaluationSpec, Evaluator, metric_names
from lightning_flows.metrics.classifier import load_classifier, save_classifier, train_classifier
from lightning_flows.metrics.conditional import requested_classes
from lightning_flows.models.base import GenerativeModel

N, CHUNK = 200, 30  # 20 per class; chunks that cut across the class cycle


class RealImages(GenerativeModel):
    """Returns real digits as its samples: of the requested class (``follows_labels``), or of a random class
    (a model that ignores the label). The pool holds only images ``pool_labels`` says are of each class."""

    def __init__(self, images: Tensor, labels: Tensor, follows_labels: bool = True):
        super().__init__(tuple(images.shape[1:]))
        self.num_classes = 10
        self.follows_labels = follows_labels
        self.register_buffer("images", images)
        self.register_buffer("labels", labels)
        self.dummy = nn.Parameter(torch.zeros(1))

    def sample(self, n: int, y: Tensor | None = None, guidance: float = 1.0) -> Tensor:
        y = torch.randint(10, (n,)) if y is None or not self.follows_labels else y
        out = []
        for c in y.tolist():
            pool = (self.labels == c).nonzero().squeeze(1)
            out.append(self.images[pool[torch.randint(len(pool), ())]])
        self.last_sample_nfe = 1
        return torch.stack(out)


@pytest.fixture(scope="module")
def classifier_file(tmp_path_factory):
    """A quickly trained digits classifier (a few epochs; deterministic)."""
    model, _ = train_classifier("digits", epochs=6, log=lambda message: None)
    return save_classifier(model, tmp_path_factory.mktemp("cls") / "classifier.pt", "digits", accuracy=0.0)


def correctly_classified_train_digits(classifier_path) -> tuple[Tensor, Tensor]:
    """Training digits (model space, at their level centres) that the classifier labels correctly, and labels."""
    dm = GenerativeDataModule("digits", conditional=True)
    dm.setup()
    raw, labels = dm.splits.train, dm.split_labels("train")
    pixels = raw.float() / (dm.levels - 1)
    with torch.no_grad():
        right = load_classifier(classifier_path)(pixels).argmax(1) == labels
    x = dm.dequantise(raw, torch.full(raw.shape, 0.5))
    return x[right], labels[right]


def spec(classifier_path, cache_dir, **kwargs) -> EvaluationSpec:
    return EvaluationSpec(n_samples=N, sample_batch_size=CHUNK, likelihood=False, kid_subsets=10, timing=False,
                          feature_extractor_weights_path=str(classifier_path), cache_dir=str(cache_dir),
                          progress=False, **kwargs)


def test_requested_classes_are_balanced():
    counts = torch.bincount(requested_classes(200, 10))
    assert counts.tolist() == [20] * 10


def test_accuracy_is_one_for_a_model_that_follows_the_class_and_chance_for_one_that_ignores_it(classifier_file,
                                                                                                 tmp_path):
    x, y = correctly_classified_train_digits(classifier_file)
    dm = GenerativeDataModule("digits", conditional=True)
    evaluator = Evaluator(spec(classifier_file, tmp_path))
    follows = evaluator.evaluate(RealImages(x, y), dm)
    torch.manual_seed(0)
    ignores = evaluator.evaluate(RealImages(x, y, follows_labels=False), dm)
    assert follows["class_accuracy"] == 1.0 and follows["n_quality_per_class"] == 20
    assert abs(ignores["class_accuracy"] - 0.1) < 0.07
    assert torch.equal(evaluator.last_labels, requested_classes(N, 10))
    # Real training digits of the right class: class-conditional FID near its real-vs-real floor, far below
    # the label-ignoring model's (whose unconditional FID is as good: the same real images).
    assert follows["class_fid_floor"] < 0.5 * ignores["class_fid"]
    assert follows["class_fid"] < 0.5 * ignores["class_fid"]
    assert follows["class_kid"] < ignores["class_kid"]
    assert 0.8 < follows["class_accuracy_real"] <= 1.0
    names = metric_names(follows)
    assert names["class_accuracy"].startswith("class_accuracy_classifier_test_n200") and "guidance" not in names


def test_unconditional_models_get_no_class_metrics(classifier_file, tmp_path):
    from test_eval_helpers import fitted_gaussian

    dm = GenerativeDataModule("digits")
    result = Evaluator(spec(classifier_file, tmp_path)).evaluate(fitted_gaussian(dm.split("train")), dm)
    assert "fid" in result and "class_accuracy" not in result and "guidance" not in result


def test_guidance_reaches_the_model_and_labels_the_result(classifier_file, tmp_path):
    x, y = correctly_classified_train_digits(classifier_file)
    model = RealImages(x, y)
    seen = []
    original = model.sample
    model.sample = lambda n, y=None, guidance=1.0: seen.append(guidance) or original(n, y, guidance)
    result = Evaluator(spec(classifier_file, tmp_path, guidance=2.5)).evaluate(model, GenerativeDataModule(
        "digits", conditional=True))
    assert set(seen) == {2.5} and result["guidance"] == 2.5
    assert metric_names(result)["class_accuracy"].endswith("_w2.5") and metric_names(result)["fid"].endswith("_w2.5")


def _ddp_worker(rank: int, world: int, classifier_path: str, cache_dir: str, out: str) -> None:
    torch.manual_seed(0)
    x, y = correctly_classified_train_digits(classifier_path)
    result = Evaluator(spec(classifier_path, cache_dir)).evaluate(RealImages(x, y, follows_labels=False),
                                                                   GenerativeDataModule("digits", conditional=True))
    torch.save(result, f"{out}/rank{rank}.pt")


@pytest.mark.slow  # a feature under 2 DDP ranks, in `make test-slow` (keeps `make test` under 10 min)
def test_two_gloo_ranks_give_the_single_process_class_metrics(classifier_file, tmp_path):
    cache = tmp_path / "cache"
    x, y = correctly_classified_train_digits(classifier_file)
    single = Evaluator(spec(classifier_file, cache)).evaluate(RealImages(x, y, follows_labels=False),
                                                              GenerativeDataModule("digits", conditional=True))
    run_ranks(_ddp_worker, str(classifier_file), str(cache), str(tmp_path), directory=tmp_path)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for key in ("class_accuracy", "class_fid", "class_kid", "class_fid_floor", "fid"):
            assert result[key] == pytest.approx(single[key], rel=1e-6, abs=1e-9), key


def test_a_conditional_vae_reports_its_marginal_bound_without_a_posterior_gap(tmp_path):
    from lightning_flows.models import VAE

    torch.manual_seed(0)
    model = VAE(data_shape=(1, 8, 8), num_classes=10, base_channels=8, iwae_k=2)
    spec = EvaluationSpec(quality=False, timing=False, max_likelihood_examples=8, likelihood_batch_size=8,
                          progress=False, cache_dir=str(tmp_path))
    result = Evaluator(spec).evaluate(model, GenerativeDataModule("digits", conditional=True))
    assert "nll_bound" in result and "posterior_gap_nats" not in result
