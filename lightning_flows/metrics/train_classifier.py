"""Train the FID feature classifier of a dataset: into the cache, into the package (``--ship``), or to check a
shipped file (``--check``).

    python -m lightning_flows.metrics.train_classifier --dataset digits [--cache-dir DIR]
    python -m lightning_flows.metrics.train_classifier --dataset digits --check   # retrain, compare with shipped
    python -m lightning_flows.metrics.train_classifier --dataset digits --ship    # write the package's file

Deterministic: the same command on the same software and CPU type gives the same weights (and fingerprint);
another CPU type may give other weights, which is why the embedded datasets' classifiers are shipped.
``--ship`` prints the line to put in ``lightning_flows.metrics.classifier.SHIPPED``.
"""

from __future__ import annotations

import argparse
import sys

from lightning_flows.metrics.classifier import (LABELLED_DATASETS, SHIPPED, WEIGHTS_DIR, classifier_path, file_sha256,
                                                load_classifier, save_classifier, shipped_classifier_path,
                                                state_fingerprint, train_classifier)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_flows.metrics.train_classifier",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, choices=LABELLED_DATASETS)
    parser.add_argument("--cache-dir", default=None, help="default: $LIGHTNING_FLOWS_CACHE or ~/.cache/lightning_flows")
    parser.add_argument("--epochs", type=int, default=None, help="default: per dataset")
    parser.add_argument("--data-dir", default="data", help="torchvision datasets (mnist, fashion_mnist)")
    parser.add_argument("--download", action="store_true", help="allow torchvision to download the data")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--ship", action="store_true", help=f"write the package's file under {WEIGHTS_DIR}")
    mode.add_argument("--check", action="store_true", help="retrain and compare with the shipped weights")
    opts = parser.parse_args(argv)

    model, accuracy = train_classifier(opts.dataset, epochs=opts.epochs, data_dir=opts.data_dir,
                                       download=opts.download)
    fingerprint = state_fingerprint(model)
    if opts.check:
        if opts.dataset not in SHIPPED:
            print(f"no shipped classifier for {opts.dataset}: it is trained on first use (fingerprint here "
                  f"{fingerprint}, test accuracy {accuracy:.4f})")
            return 1
        path = shipped_classifier_path(opts.dataset)
        shipped = state_fingerprint(load_classifier(path, sha256=SHIPPED[opts.dataset][1]))
        same = shipped == fingerprint
        print(f"shipped {path}: sha256 {file_sha256(path)}, fingerprint {shipped}; retrained here: fingerprint "
              f"{fingerprint}, test accuracy {accuracy:.4f} -> {'identical weights' if same else 'OTHER weights'}")
        return 0 if same else 1
    if opts.ship:
        path = save_classifier(model, WEIGHTS_DIR / f"{opts.dataset}_classifier.pt", opts.dataset, accuracy)
    else:
        path = save_classifier(model, classifier_path(opts.dataset, opts.cache_dir), opts.dataset, accuracy)
    print(f"wrote {path}: test accuracy {accuracy:.4f}, fingerprint {fingerprint}, sha256 {file_sha256(path)}")
    if opts.ship:
        print(f'SHIPPED entry: "{opts.dataset}": ("{path.name}",\n    "{file_sha256(path)}", "{fingerprint}"),')
    return 0


if __name__ == "__main__":
    sys.exit(main())
