"""Datasets: the zarr replay buffer (``replay_buffer``), the sequence sampler, the torch
dataset over them, normalization statistics, motion-foresight targets, and the LIBERO
and LeRobot converters. Nothing is imported here: each module pulls in only what it needs
(zarr, torch, h5py, lerobot)."""
