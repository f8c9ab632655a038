"""Which source a ``data.dataset`` value names: a registered name, a named download, a folder or an ``.npz`` file.

Adding a source is one module in ``data/`` (a class with ``info``, ``catalogue(seed)`` and ``read(positions)``;
see :mod:`lightning_flows.data.source`) and one line here.
"""

from __future__ import annotations

from pathlib import Path

from lightning_flows.data.cache import DataSourceError
from lightning_flows.data.registry import DATASET_INFO, DatasetInfo
from lightning_flows.data.source import SourceOptions


def named_sources() -> dict[str, type]:
    from lightning_flows.data.named import NAMED_SOURCES

    return NAMED_SOURCES


def known_names() -> list[str]:
    return sorted([*DATASET_INFO, *named_sources()])


def is_registered(dataset: str) -> bool:
    """A dataset of :mod:`lightning_flows.data.registry` (loaded in memory by name)."""
    return dataset in DATASET_INFO


def open_source(dataset: str, options: SourceOptions | None = None):
    """The source ``dataset`` names, with its facts read (a clear :class:`DataSourceError` for bad input)."""
    options = options or SourceOptions()
    if dataset in DATASET_INFO:
        from lightning_flows.data.registered import RegisteredSource

        return RegisteredSource(dataset, options)
    if dataset in named_sources():
        return named_sources()[dataset](dataset, options)
    path = Path(str(dataset)).expanduser()
    if path.is_dir():
        from lightning_flows.data.folder import FolderSource

        return FolderSource(dataset, options)
    if path.suffix.lower() == ".npz":
        from lightning_flows.data.arrays import ArraySource

        return ArraySource(dataset, options)
    if path.exists():
        raise DataSourceError(f"--data.dataset {dataset} is a file but not an .npz array file; pass a folder of "
                              f"images or an .npz with 'images' (and optionally 'labels').")
    if any(sep in str(dataset) for sep in ("/", "\\", "~")) or str(dataset).startswith("."):
        raise DataSourceError(f"--data.dataset {dataset}: no such file or directory. Pass a folder of images, an "
                              f".npz file or a dataset name ({', '.join(known_names())}).")
    raise DataSourceError(f"Unknown dataset '{dataset}'. Choose one of: {', '.join(known_names())}, or pass the path "
                          f"of a folder of images or of an .npz file.")


def dataset_info(dataset: str, **options) -> DatasetInfo:
    """The facts of ``dataset`` (a name or a path; ``options``: :class:`SourceOptions` fields, e.g. image_size)."""
    if dataset in DATASET_INFO and not options:
        return DATASET_INFO[dataset]
    return open_source(dataset, SourceOptions(**options)).info
