"""Datasets and the DataModule every family shares: registered names, named downloads, folders and array files
(:mod:`lightning_flows.data.resolve`), in memory or streamed (:mod:`lightning_flows.data.streaming`)."""

from lightning_flows.data.cache import DataSourceError
from lightning_flows.data.datamodule import GenerativeDataModule
from lightning_flows.data.registry import DATASET_INFO, DatasetInfo, load_dataset
from lightning_flows.data.resolve import dataset_info

__all__ = ["GenerativeDataModule", "DATASET_INFO", "DataSourceError", "DatasetInfo", "dataset_info", "load_dataset"]
