"""Networks: the Wan2.1 text-to-video DiT (teacher, student and fake score share it) and the Wan2.1 VAE."""
from rcm.models.wan_dit import WanDiT, WanDiTConfig, build_wan_dit
from rcm.models.wan_vae import WanVAE, WanVAEConfig, load_wan_vae

__all__ = ["WanDiT", "WanDiTConfig", "build_wan_dit", "WanVAE", "WanVAEConfig", "load_wan_vae"]
