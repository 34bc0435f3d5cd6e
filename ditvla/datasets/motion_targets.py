"""Motion-foresight targets: optical flow between frame t and t+k, as small motion images.

For every frame t of an episode spanning ``[start, end)``, the target is the dense optical
flow of one camera from frame t to frame t + k (OpenCV's DIS or Farneback on grayscale
frames), reduced to a ``size`` x ``size`` 2-channel motion image whose values are
displacements in motion-image pixels (x, y). The last k frames of an episode have no
such future: their targets are NaN, and the head's loss leaves them out.

Targets are computed once per store and cached beside the data, in
``derived/motion.<camera>`` (float16; for a store by URL, which opens read-only, in a zarr
group of its cache folder, see :mod:`~ditvla.datasets.url_stores`), with the settings
that made them and the frame count in its attributes; they are recomputed when ``k``, the
method or the size change or when episodes were appended. The attributes are written
last, so an interrupted computation is never mistaken for a finished one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import zarr
from tqdm.auto import tqdm

from ditvla.datasets.replay_buffer import DatasetError, ReplayBuffer
from ditvla.datasets.url_stores import cache_folder, is_url
from ditvla.errors import ConfigError

FLOW_METHODS = ("dis", "farneback")
DERIVED_GROUP = "derived"


@dataclass(frozen=True)
class MotionTargetSpec:
    camera: str
    k: int = 4
    method: str = "dis"
    size: int = 16

    def __post_init__(self) -> None:
        if self.method not in FLOW_METHODS:
            raise ConfigError(f"unknown flow method {self.method!r}; choose {FLOW_METHODS}")
        if self.k < 1 or self.size < 2:
            raise ConfigError(f"need k >= 1 and size >= 2, got k={self.k}, size={self.size}")


def _gray(frame: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)


class FlowEstimator:
    """Dense optical flow (H, W, 2) in pixels from one RGB uint8 frame to another."""

    def __init__(self, method: str = "dis"):
        if method not in FLOW_METHODS:
            raise ConfigError(f"unknown flow method {method!r}; choose {FLOW_METHODS}")
        self.method = method
        self._dis = None
        if method == "dis":
            self._dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)

    def __call__(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        a, b = _gray(first), _gray(second)
        if self._dis is not None:
            return self._dis.calc(a, b, None)
        return cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 9, 3, 5, 1.1, 0)


def motion_image(flow: np.ndarray, size: int) -> np.ndarray:
    """A flow field (H, W, 2) in pixels -> (size, size, 2) in motion-image pixels."""
    h, w = flow.shape[:2]
    small = cv2.resize(flow, (size, size), interpolation=cv2.INTER_AREA)
    return small * np.array([size / w, size / h], np.float32)


def flow_to_rgb(motion: np.ndarray, max_magnitude: float | None = None) -> np.ndarray:
    """The usual HSV picture of a flow field (hue: direction, value: speed), as RGB uint8."""
    dx, dy = (np.ascontiguousarray(motion[..., i], np.float32) for i in (0, 1))
    magnitude, angle = cv2.cartToPolar(dx, dy)
    top = max_magnitude or float(magnitude.max()) or 1.0
    hsv = np.zeros((*motion.shape[:2], 3), np.uint8)
    hsv[..., 0] = (angle * 90 / np.pi).astype(np.uint8)
    hsv[..., 1] = 255
    hsv[..., 2] = np.clip(magnitude / top * 255, 0, 255).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def compute_motion_targets(
    buffer: ReplayBuffer, spec: MotionTargetSpec, progress: bool = True
) -> np.ndarray:
    """Targets (N, size, size, 2) float32 for every frame of ``buffer``."""
    if spec.camera not in buffer.cameras:
        raise DatasetError(
            f"{buffer.path}: no camera {spec.camera!r} for motion targets "
            f"(cameras: {', '.join(buffer.cameras) or 'none'})"
        )
    flow = FlowEstimator(spec.method)
    out = np.full((buffer.n_frames, spec.size, spec.size, 2), np.nan, np.float32)
    bar = tqdm(
        total=buffer.n_frames,
        desc=f"motion targets {spec.camera}",
        unit="frame",
        disable=not progress,
    )
    for episode in range(buffer.n_episodes):
        start, end = buffer.episode_bounds(episode)
        frames = buffer.read(spec.camera, start, end)
        for t in range(end - start - spec.k):
            out[start + t] = motion_image(flow(frames[t], frames[t + spec.k]), spec.size)
        bar.update(end - start)
    bar.close()
    return out


def _derived_group(path: str | Path, cache_dir: str | Path | None, mode: str) -> zarr.Group | None:
    """The group cached targets of the store at ``path`` live in: its ``derived/``, or for
    a store by URL (read-only) a local zarr group in its cache folder. None where there is
    none yet (``mode="r"``) or it cannot be written (``mode="a"``: a read-only medium)."""
    if is_url(path):
        location = cache_folder(str(path), cache_dir) / "targets.zarr"
        if mode == "r" and not location.exists():
            return None
        return zarr.open_group(str(location), mode="a")
    try:
        root = zarr.open_group(str(path), mode=mode)
    except (OSError, PermissionError):  # a read-only store: the targets go uncached
        return None
    if mode == "r":
        return root.get(DERIVED_GROUP)
    return root.require_group(DERIVED_GROUP)


def load_or_compute_motion_targets(
    path: str | Path,
    spec: MotionTargetSpec,
    progress: bool = True,
    cache_dir: str | Path | None = None,
) -> tuple[np.ndarray, float]:
    """Cached targets (float16) of the store at ``path`` (computed and saved if missing or
    stale), and their root-mean-square value (the scale the head normalizes by). For a
    store by URL they are kept under ``cache_dir`` (a training run's ``<out>/cache``;
    default: this machine's ``$DITVLA_CACHE``)."""
    buffer = ReplayBuffer.open(path)
    name = f"motion.{spec.camera}"
    wanted = {**asdict(spec), "n_frames": buffer.n_frames}
    group = _derived_group(path, cache_dir, "r")
    if group is not None and name in group:
        cached = group[name]
        attrs = dict(cached.attrs)
        if attrs.get("settings") == wanted and "rms" in attrs:
            return cached[:], float(attrs["rms"])
    computed = compute_motion_targets(buffer, spec, progress)
    finite = np.isfinite(computed).any()
    rms = float(np.sqrt(np.nanmean(computed**2))) if finite else 1.0
    targets = computed.astype(np.float16)
    group = _derived_group(path, cache_dir, "a")
    if group is None:
        return targets, rms
    if name in group:
        del group[name]
    array = group.create_array(
        name, shape=targets.shape, dtype="float16", chunks=(1024, *targets.shape[1:])
    )
    array[:] = targets
    array.attrs.update({"settings": wanted, "rms": rms})  # last: marks the array complete
    return targets, rms
