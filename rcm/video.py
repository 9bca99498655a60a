"""Decoded video tensors → mp4 files (H.264 through imageio's ffmpeg plugin).

imageio and imageio-ffmpeg (which ships its own ffmpeg binary) are optional: `pip install rcm-slurm[video]`.
"""
from __future__ import annotations

from pathlib import Path

import torch

INSTALL_HINT = "pip install rcm-slurm[video] (or: pip install imageio imageio-ffmpeg)"
# imageio's 0–10 scale; 8 becomes libx264 -crf 10, the setting of Wan2.1's own `cache_video`.
MP4_QUALITY = 8


def require_video_writer() -> None:
    """Raise ImportError saying what to install when imageio or imageio-ffmpeg is missing."""
    missing = []
    for module in ("imageio", "imageio_ffmpeg"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module.replace("_", "-"))
    if missing:
        raise ImportError(f"writing mp4 files needs {' and '.join(missing)} (not installed): {INSTALL_HINT}")


def video_to_uint8_frames(video_CTHW: torch.Tensor) -> torch.Tensor:
    """A video (3, T, H, W) in [-1, 1] as uint8 frames (T, H, W, 3) on the CPU, rounded to nearest."""
    if video_CTHW.dim() != 4 or video_CTHW.shape[0] != 3:
        raise ValueError(f"expected an RGB video (3, T, H, W) in [-1, 1], got shape {tuple(video_CTHW.shape)}")
    scaled = (video_CTHW.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5
    return scaled.round().to(torch.uint8).permute(1, 2, 3, 0).contiguous().cpu()


def write_mp4(video_CTHW: torch.Tensor, path: str | Path, fps: int = 16) -> Path:
    """Write a video (3, T, H, W) in [-1, 1] as an H.264 mp4 (yuv420p) at ``fps``; returns the path."""
    require_video_writer()
    import imageio.v2 as imageio

    frames = video_to_uint8_frames(video_CTHW)
    _, height, width, _ = frames.shape
    # yuv420p stores color at half resolution, so libx264 refuses odd sizes; imageio would instead
    # rescale the video silently (macro_block_size), and the file would not match the decoded frames.
    if height % 2 or width % 2:
        raise ValueError(f"H.264 (yuv420p) needs an even frame height and width, got {height}×{width}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with imageio.get_writer(path, format="FFMPEG", mode="I", fps=fps, codec="libx264", quality=MP4_QUALITY,
                            pixelformat="yuv420p", macro_block_size=1) as writer:
        for frame in frames.numpy():
            writer.append_data(frame)
    return path


__all__ = ["INSTALL_HINT", "require_video_writer", "video_to_uint8_frames", "write_mp4"]
