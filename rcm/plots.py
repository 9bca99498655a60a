"""PNG plots of toy samples against the true modes."""
from __future__ import annotations

from pathlib import Path

import torch


def spatial_means(latents: torch.Tensor) -> torch.Tensor:
    """(N, C, T, H, W) -> (N, C·T): toy modes vary over channels and frames only."""
    return latents.float().mean(dim=(-2, -1)).flatten(1)


def plot_toy_samples(
    panels: dict[str, tuple[torch.Tensor, torch.Tensor]], mixture, path: str | Path, classes=(0, 1, 2, 3), max_points: int = 200
) -> Path:
    """One panel per sampler: samples of a few classes and the true modes (stars sized by weight),
    projected on the two leading principal axes of those classes' mode means."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = [c for c in classes if c < mixture.config.num_classes]
    modes = spatial_means(mixture.means[classes].flatten(0, 1))  # (classes·modes, C·T)
    center = modes.mean(0)
    _, _, v = torch.linalg.svd(modes - center, full_matrices=False)
    axes_2d = v[:2].T

    def project(x: torch.Tensor) -> torch.Tensor:
        return (x - center) @ axes_2d

    colors = plt.get_cmap("tab10")
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), squeeze=False)
    for ax, (title, (samples, ids)) in zip(axes[0], panels.items()):
        for i, class_id in enumerate(classes):
            points = project(spatial_means(samples[ids == class_id][:max_points]))
            ax.scatter(points[:, 0], points[:, 1], s=4, alpha=0.35, color=colors(i), label=f"prompt {class_id}")
            true = project(spatial_means(mixture.means[class_id]))
            sizes = 400 * mixture.weights[class_id]
            ax.scatter(true[:, 0], true[:, 1], marker="*", s=sizes, color=colors(i), edgecolors="black", linewidths=0.8)
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][0].legend(loc="best", fontsize=7, markerscale=3)
    figure.suptitle("samples (dots) vs true modes (stars, size = weight); 2-D projection of the per-frame channel means")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
