"""Networks: the Wan2.1 text-to-video DiT (teacher, student and fake score share it)."""
from rcm.models.wan_dit import WanDiT, WanDiTConfig, build_wan_dit

__all__ = ["WanDiT", "WanDiTConfig", "build_wan_dit"]
