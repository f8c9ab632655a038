"""Train and cache the FID feature classifier of a dataset.

    python -m lightning_flows.metrics.train_classifier --dataset digits [--cache-dir DIR]

Deterministic: the same command on the same software gives the same weights (and fingerprint).
"""

from __future__ import annotations

import argparse

from lightning_flows.metrics.classifier import (LABELLED_DATASETS, classifier_path, save_classifier,
                                                state_fingerprint, train_classifier)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lightning_flows.metrics.train_classifier",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, choices=LABELLED_DATASETS)
    parser.add_argument("--cache-dir", default=None, help="default: $LIGHTNING_FLOWS_CACHE or ~/.cache/lightning_flows")
    parser.add_argument("--epochs", type=int, default=None, help="default: per dataset")
    parser.add_argument("--data-dir", default="data", help="torchvision datasets (mnist, fashion_mnist)")
    parser.add_argument("--download", action="store_true", help="allow torchvision to download the data")
    opts = parser.parse_args(argv)

    model, accuracy = train_classifier(opts.dataset, epochs=opts.epochs, data_dir=opts.data_dir,
                                       download=opts.download)
    path = save_classifier(model, classifier_path(opts.dataset, opts.cache_dir), opts.dataset, accuracy)
    print(f"wrote {path}: test accuracy {accuracy:.4f}, fingerprint {state_fingerprint(model)}")


if __name__ == "__main__":
    main()
