"""Datasets: the zarr replay buffer, the sequence sampler, normalization, converters."""

from ditvla.datasets.normalization import Normalizer, compute_stats, load_or_compute_stats
from ditvla.datasets.replay_buffer import DatasetError, ReplayBuffer, Task
from ditvla.datasets.sequence_sampler import SampleFrames, SequenceSampler
from ditvla.datasets.torch_dataset import ImageAugmentation, ReplayBufferDataset

__all__ = [
    "DatasetError",
    "ImageAugmentation",
    "Normalizer",
    "ReplayBuffer",
    "ReplayBufferDataset",
    "SampleFrames",
    "SequenceSampler",
    "Task",
    "compute_stats",
    "load_or_compute_stats",
]
