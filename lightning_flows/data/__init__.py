"""Datasets and the DataModule every family shares."""

from lightning_flows.data.datamodule import GenerativeDataModule
from lightning_flows.data.registry import DATASET_INFO, DatasetInfo, dataset_info, load_dataset

__all__ = ["GenerativeDataModule", "DATASET_INFO", "DatasetInfo", "dataset_info", "load_dataset"]
