"""Profile the fused JVP-mode sCM step on a few Wan 1.3B blocks at 480p: top CUDA kernels."""
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.argv = [sys.argv[0]]
from rcm.distill.jvp import velocity_and_tangent  # noqa: E402
from rcm.distill.scm import scm_loss  # noqa: E402
from rcm.models.wan_dit import WanDiT, WanDiTConfig  # noqa: E402
from rcm.parallel.activation_checkpointing import apply_activation_checkpointing  # noqa: E402

config = WanDiTConfig(dim=1536, ffn_dim=8960, freq_dim=256, text_dim=4096, text_len=512, num_heads=12, num_layers=2,
                      in_channels=16, out_channels=16, patch_size=(1, 2, 2), attention_backend="triton")
model = WanDiT(config).cuda()
apply_activation_checkpointing(model)
shape = (1, 16, 21, 60, 104)
x0, noise = torch.randn(shape, device="cuda"), torch.randn(shape, device="cuda")
context = torch.randn(1, 512, 4096, device="cuda")
t = torch.tensor([0.9], dtype=torch.float64, device="cuda")


def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = scm_loss(model, x0, noise, t, context, x0, 2000, 1000, 100.0, jvp=velocity_and_tangent)
    out.loss.backward()


step()
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
    step()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
