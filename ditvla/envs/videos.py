"""Rollout videos that play in a browser: H.264 in MP4, written with PyAV (FFmpeg).

OpenCV's ``mp4v`` writes MPEG-4 Part 2, which browsers and many players refuse; LeRobot
writes its datasets' videos with PyAV, and so do we: libx264, yuv420p (what every player
decodes, which needs even sides: odd frames are padded by one pixel), the index at the
front of the file (``faststart``) so a browser starts playing before the end arrives.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

VIDEO_CODEC = "libx264"


def write_video(path: Path, frames: Sequence[np.ndarray], fps: int = 30) -> None:
    """Write uint8 RGB ``frames`` (H, W, 3) to ``path`` as an H.264 MP4."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = frames[0].shape[:2]
    pad = ((0, height % 2), (0, width % 2), (0, 0))
    with av.open(str(path), mode="w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream(VIDEO_CODEC, rate=fps)
        stream.width, stream.height = width + width % 2, height + height % 2
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            picture = av.VideoFrame.from_ndarray(np.pad(frame, pad, mode="edge"), format="rgb24")
            container.mux(stream.encode(picture))
        container.mux(stream.encode())
