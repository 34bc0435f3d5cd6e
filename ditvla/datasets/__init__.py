"""Datasets: the zarr replay buffer, the sequence sampler, normalization, converters.

The torch-facing parts live in ``ditvla.datasets.torch_dataset`` and
``ditvla.datasets.normalization`` (imported on demand: they pull in torch).
"""

from ditvla.datasets.replay_buffer import DatasetError, ReplayBuffer, Task
from ditvla.datasets.sequence_sampler import SampleFrames, SequenceSampler

__all__ = ["DatasetError", "ReplayBuffer", "SampleFrames", "SequenceSampler", "Task"]
