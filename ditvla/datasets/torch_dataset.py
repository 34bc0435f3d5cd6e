"""The torch ``Dataset`` over a replay buffer: observation history + action chunk samples.

Low-dimensional arrays (state parts, actions) are read into memory once: they are small
next to the images, which stay on disk and are read frame by frame for each sample, so
memory stays bounded for stores larger than RAM. DataLoader workers read frames through
:class:`~ditvla.datasets.chunk_files.FrameReader`; the store is reopened in each process
that uses the dataset, so forked and spawned workers both work.

A sample (one anchor frame ``t``)::

    {"images": {camera: uint8 (n_obs_steps, H, W, 3)},
     "state": float32 (n_obs_steps, D), "action": float32 (horizon, A),
     "obs_is_pad": bool (n_obs_steps,), "action_is_pad": bool (horizon,),
     "instruction": str, "task_index": int, "episode_index": int, "frame_index": int}

With ``future_frame=(camera, k)`` a sample also holds ``"future_image"``: uint8 (H, W, 3),
that camera's frame t+k (not augmented), and ``"future_is_pad"``: True where t+k lies
beyond the episode (the last frame is given then) — the latent-foresight targets.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ditvla.contract import DataSpec, Stats
from ditvla.datasets.replay_buffer import DatasetError, ReplayBuffer
from ditvla.datasets.sequence_sampler import SampleFrames, SequenceSampler
from ditvla.datasets.statistics import concat_stats, load_or_compute_stats


@dataclass(frozen=True)
class ImageAugmentation:
    """Random shift (pad by replication, crop back: DrQ / diffusion-policy style) and
    brightness/contrast jitter, drawn once per camera per sample and applied alike to
    every observation step of that sample."""

    max_shift_px: int = 4
    brightness: float = 0.1
    contrast: float = 0.1

    def __call__(self, frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """frames: uint8 (T, H, W, 3) -> uint8 (T, H, W, 3)."""
        out = frames
        if self.max_shift_px > 0:
            p = self.max_shift_px
            _, h, w, _ = frames.shape
            padded = np.pad(frames, ((0, 0), (p, p), (p, p), (0, 0)), mode="edge")
            dy, dx = rng.integers(0, 2 * p + 1, size=2)
            out = padded[:, dy : dy + h, dx : dx + w]
        if self.brightness > 0 or self.contrast > 0:
            gain = 1.0 + rng.uniform(-self.contrast, self.contrast)
            bias = 255.0 * rng.uniform(-self.brightness, self.brightness)
            mean = out.mean()
            out = np.clip((out - mean) * gain + mean + bias, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(out)


def with_made_up_words(
    text: str, probability: float, rng: np.random.Generator, keep: frozenset[str] = frozenset()
) -> str:
    """``text``, or with ``probability`` ``text`` with one of its words (never one in
    ``keep``) replaced by a made-up word of 3-8 random lowercase letters (instruction
    augmentation: word-level noise, one word at a time as a reworded instruction changes
    one)."""
    words = text.split()
    replaceable = [i for i, word in enumerate(words) if word not in keep]
    if not replaceable or rng.random() >= probability:
        return text
    letters = rng.integers(ord("a"), ord("z") + 1, size=int(rng.integers(3, 9)))
    words[replaceable[int(rng.integers(len(replaceable)))]] = "".join(map(chr, letters))
    return " ".join(words)


def telling_words(instructions: Sequence[str]) -> dict[str, frozenset[str]]:
    """For each of ``instructions``, the words that tell it from the others: the words no
    other holds ("door" in "open the door" beside "slide the window open"), and those of
    the one run in which another differs from it ("green" in "reach the green ball"
    beside "reach the blue ball"; "next" and "to" in "pick up the bowl next to the plate"
    beside "pick up the bowl on the plate"). These are the words that decide which task
    is asked: word-level noise spares them (with "door" made up like any other word, the
    demo's door-open fell from 46 to 12 of 50 episodes under a nudged camera)."""
    split = {text: text.split() for text in instructions}
    holders = Counter(word for words in split.values() for word in set(words))
    telling = {text: {w for w in words if holders[w] == 1} for text, words in split.items()}
    for text, words in split.items():
        for other, other_words in split.items():
            if other == text:
                continue
            opcodes = SequenceMatcher(None, words, other_words, autojunk=False).get_opcodes()
            changes = [words[i1:i2] for tag, i1, i2, _, _ in opcodes if tag != "equal"]
            shared = sum(i2 - i1 for tag, i1, i2, _, _ in opcodes if tag == "equal")
            # one run differs and the two share at least as many words as it holds
            if len(changes) == 1 and len(changes[0]) <= shared:
                telling[text].update(changes[0])
    return {text: frozenset(found) for text, found in telling.items()}


class ReplayBufferDataset(Dataset):
    """Samples of a zarr replay buffer for training, one per frame of the chosen episodes.

    Args:
        path: the zarr store.
        n_obs_steps: observation history length (current frame included).
        horizon: action chunk length H (a policy's own, e.g. ``PolicyConfig.horizon``).
        cameras: cameras to return (default: all of the store's).
        state_keys: data keys concatenated into ``state`` (default: the store's).
        action_key: data key of the actions.
        episodes: episode indices to draw from (default: all), e.g. a train/val split.
        augmentation: image augmentation applied to each sample, or None.
        future_frame: ``(camera, k)`` to add that camera's frame t+k to each sample.
        camera_dropout: camera -> probability that a sample's frames of it are zeros.
        cache_dir: where a store by URL's statistics and the objects read from it are
            kept (a training run's ``<out>/cache``; default: statistics in this machine's
            ``$DITVLA_CACHE``, objects read from the server each time).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        n_obs_steps: int = 2,
        horizon: int = 1,
        cameras: Sequence[str] | None = None,
        state_keys: Sequence[str] | None = None,
        action_key: str = "action",
        episodes: Sequence[int] | None = None,
        augmentation: ImageAugmentation | None = None,
        future_frame: tuple[str, int] | None = None,
        camera_dropout: dict[str, float] | None = None,
        cache_dir: str | Path | None = None,
    ):
        buffer = ReplayBuffer.open(path, cache_dir=cache_dir)
        self.path = buffer.path  # a folder, or a URL as given
        self.cache_dir = cache_dir
        self.cameras = list(buffer.cameras if cameras is None else cameras)
        self.state_keys = list(buffer.state_keys if state_keys is None else state_keys)
        self.action_key = action_key
        unknown = [cam for cam in self.cameras if cam not in buffer.cameras]
        if unknown:
            raise DatasetError(
                f"{self.path}: no camera {', '.join(unknown)}; the store's cameras are "
                f"{', '.join(buffer.cameras) or 'none'}"
            )
        for key in [*self.state_keys, action_key]:
            buffer.array(key)  # names the store and the key if it is missing
        self.augmentation = augmentation
        self.camera_dropout = dict(camera_dropout or {})
        self.future_frame = future_frame
        if future_frame is not None and (
            future_frame[0] not in self.cameras or future_frame[1] < 1
        ):
            raise DatasetError(
                f"{self.path}: future_frame must be (one of {self.cameras}, k >= 1), "
                f"got {future_frame}"
            )
        self.sampler = SequenceSampler(
            buffer.episode_ends, n_obs_steps=n_obs_steps, horizon=horizon, episodes=episodes
        )
        self.action = buffer.read_all(action_key).astype(np.float32)
        if self.action.ndim != 2:
            raise DatasetError(
                f"{self.path}: data/{action_key} must be (T, A), found {self.action.shape}"
            )
        parts = [
            buffer.read_all(k).astype(np.float32).reshape(buffer.n_frames, -1)
            for k in self.state_keys
        ]
        self.state = (
            np.concatenate(parts, axis=1) if parts else np.zeros((buffer.n_frames, 0), np.float32)
        )
        self.instructions = [buffer.episode_task(e).instruction for e in range(buffer.n_episodes)]
        self.task_index = buffer.episode_task_index
        self.image_shapes = {cam: buffer.shape(cam) for cam in self.cameras}
        self.fps = buffer.fps
        # per-frame training targets computed elsewhere (e.g. motion images), by name:
        # arrays (n_frames, ...) whose row of the current frame is added to each sample
        self.frame_targets: dict[str, np.ndarray] = {}
        # instruction augmentation: an instruction -> other words for it; each sample reads
        # the instruction or one of these, drawn with the augmentation's generator
        self.instruction_variants: dict[str, list[str]] = {}
        # word-level noise: the probability that one word of a sample's instruction is
        # replaced by a made-up one (never a word that tells it from another,
        # :func:`telling_words`)
        self.instruction_noise = 0.0
        self._telling: dict[str, frozenset[str]] | None = None
        self._buffer: ReplayBuffer | None = buffer
        self._pid = os.getpid()
        self._rng: np.random.Generator | None = None

    # The open store and the random generator belong to one process.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_buffer"] = None
        state["_rng"] = None
        return state

    def _process_local(self) -> tuple[ReplayBuffer, np.random.Generator]:
        if self._buffer is None or self._pid != os.getpid():
            self._buffer = ReplayBuffer.open(self.path, cache_dir=self.cache_dir)
            self._rng = None
            self._pid = os.getpid()
        if self._rng is None:
            self._rng = np.random.default_rng(torch.initial_seed() % 2**63)
        return self._buffer, self._rng

    @property
    def action_dim(self) -> int:
        return self.action.shape[1]

    @property
    def state_dim(self) -> int:
        return self.state.shape[1]

    def stats(self) -> Stats:
        """Normalization statistics of ``action``, ``state`` and each camera."""
        buffer, _ = self._process_local()
        stored = load_or_compute_stats(buffer, self.cache_dir)
        stats = {"action": stored[self.action_key]}
        if self.state_keys:
            stats["state"] = concat_stats([stored[k] for k in self.state_keys])
        stats.update({cam: stored[cam] for cam in self.cameras})
        return stats

    def data_spec(self) -> DataSpec:
        """The description of this data that a policy is configured from."""
        sizes = {shape[:2] for shape in self.image_shapes.values()}
        if len(sizes) > 1 or any(h != w for h, w in sizes):
            raise DatasetError(
                f"{self.path}: a policy needs cameras of one square image size, the store has "
                + ", ".join(f"{cam} {h}x{w}" for cam, (h, w, _) in self.image_shapes.items())
            )
        return DataSpec(
            cameras=tuple(self.cameras),
            image_size=next(iter(sizes))[0] if sizes else 0,
            state_dim=self.state_dim,
            action_dim=self.action_dim,
            state_keys=tuple(self.state_keys),
            stats=self.stats(),
        )

    def __len__(self) -> int:
        return len(self.sampler)

    def _instruction(self, episode: int, rng: np.random.Generator) -> str:
        """The episode's instruction, or one of its variants (each as likely), with
        probability ``instruction_noise`` one word made up, never one that tells it from
        another instruction (:func:`telling_words`)."""
        instruction = self.instructions[episode]
        variants = self.instruction_variants.get(instruction)
        if variants:
            pick = int(rng.integers(len(variants) + 1))
            instruction = variants[pick - 1] if pick else instruction
        if self.instruction_noise:
            if self._telling is None:  # the store's instructions', for all their variants
                self._telling = telling_words(sorted(set(self.instructions)))
            keep = self._telling[self.instructions[episode]]
            instruction = with_made_up_words(instruction, self.instruction_noise, rng, keep)
        return instruction

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """A batch of samples; the DataLoader calls this once per batch."""
        buffer, rng = self._process_local()
        frames = self.sampler.frames(indices)
        images = {
            cam: buffer.read_frames(cam, frames.obs.reshape(-1)).reshape(
                *frames.obs.shape, *self.image_shapes[cam]
            )
            for cam in self.cameras
        }
        future = self._future_frames(buffer, frames) if self.future_frame else None
        samples = []
        for i in range(len(frames.anchor)):
            episode = int(frames.episode[i])
            anchor = int(frames.anchor[i])
            sample_images = {}
            for cam, batch in images.items():
                view = batch[i] if self.augmentation is None else self.augmentation(batch[i], rng)
                if cam in self.camera_dropout and rng.random() < self.camera_dropout[cam]:
                    view = np.zeros_like(view)  # this sample acts without the camera
                sample_images[cam] = torch.from_numpy(np.ascontiguousarray(view))
            samples.append(
                {
                    "images": sample_images,
                    "state": torch.from_numpy(self.state[frames.obs[i]]),
                    "action": torch.from_numpy(self.action[frames.action[i]]),
                    "obs_is_pad": torch.from_numpy(frames.obs_is_pad[i]),
                    "action_is_pad": torch.from_numpy(frames.action_is_pad[i]),
                    "instruction": self._instruction(episode, rng),
                    "task_index": int(self.task_index[episode]),
                    "episode_index": episode,
                    "frame_index": anchor,
                    **{
                        name: torch.from_numpy(values[anchor].astype(np.float32))
                        for name, values in self.frame_targets.items()
                    },
                }
            )
            if future is not None:
                samples[-1]["future_image"] = torch.from_numpy(future[0][i])
                samples[-1]["future_is_pad"] = bool(future[1][i])
        return samples

    def _future_frames(
        self, buffer: ReplayBuffer, frames: SampleFrames
    ) -> tuple[np.ndarray, np.ndarray]:
        """Frames t+k of the future camera (the episode's last where t+k lies beyond it)."""
        camera, k = self.future_frame
        wanted = frames.anchor + k
        rows = np.minimum(wanted, frames.last)
        return buffer.read_frames(camera, rows), wanted > frames.last
