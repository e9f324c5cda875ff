"""Video frames for training, evaluation and ``pmod visualize``, decoded with PyAV.

    frames = read_frames("clip.mp4", num_frames=8)   # (8, height, width, 3) uint8, RGB

PyAV binds FFmpeg's own libraries and its wheels bundle them for Linux, macOS and Windows, so it
decodes what FFmpeg decodes with nothing else to install; transformers' ``load_video`` uses it by
default too. The alternatives fall short here: decord has had no release since 2022 (no wheels for
current Pythons or ARM Macs), and torchvision removed its video reader in 0.26.

Frames are spaced uniformly over the whole video, first and last included (as LLaVA-OneVision
samples them). A video with fewer frames than asked repeats some, so every video has exactly
``num_frames`` frames: the model stacks a batch's videos into one tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


class VideoError(Exception):
    """A video that cannot be read (the message says why)."""


def frame_indices(total_frames: int, num_frames: int) -> list[int]:
    """``num_frames`` indices spread evenly over ``[0, total_frames - 1]`` (repeats when too few)."""
    if total_frames < 1:
        raise VideoError("it has no frames")
    return np.linspace(0, total_frames - 1, num_frames).round().astype(int).tolist()


def check_video(path: str | Path) -> None:
    """Open the container and find a video stream (no decoding); VideoError if that fails."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError("it has no video stream")
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as err:
        raise VideoError(f"{type(err).__name__}: {err}") from None


def read_frames(path: str | Path, num_frames: int) -> np.ndarray:
    """(num_frames, height, width, 3) uint8 RGB frames of the video at ``path``; VideoError if unreadable."""
    import av

    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError("it has no video stream")
            stream = container.streams.video[0]
            total = stream.frames or _count_frames(container, stream)
            wanted = frame_indices(total, num_frames)
            container.seek(0)
            stream.thread_type = "AUTO"
            decoded: dict[int, np.ndarray] = {}
            for index, frame in enumerate(container.decode(stream)):
                if index > wanted[-1]:
                    break
                if index in wanted:  # only the chosen frames pay for the RGB conversion
                    decoded[index] = frame.to_ndarray(format="rgb24")
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as err:
        raise VideoError(f"{type(err).__name__}: {err}") from None
    if not decoded:
        raise VideoError("no frame could be decoded")
    # a container may announce more frames than it holds: the last decoded frame stands in
    last = decoded[max(decoded)]
    return np.stack([decoded.get(index, last) for index in wanted])


def _count_frames(container, stream) -> int:
    """Frames of a stream whose container does not say: its packets, counted without decoding."""
    count = sum(1 for packet in container.demux(stream) if packet.size)
    container.seek(0)
    return count


def write_video(path: str | Path, frames: Sequence[np.ndarray] | np.ndarray, fps: int = 4) -> Path:
    """Encode (frames, height, width, 3) uint8 RGB frames as an MPEG-4 video (even sizes)."""
    import av

    path = Path(path)
    frames = np.asarray(frames, dtype=np.uint8)
    _, height, width, _ = frames.shape
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"qscale": "2"}  # near-lossless: colours survive the round trip
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush
            container.mux(packet)
    return path
