"""Figures for benchmark results (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import TiltgenError
from .analytic_cases import get_case


def plot_analytic_2d(result, path: str | Path, max_points: int = 1500) -> Path:
    """Grid of panels: rows = (2-D case, family), columns = methods; samples over exp. tilted density."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(result.samples)
    if not keys:
        raise TiltgenError("--plot draws the 2-D cases, but none was run")
    rows = list(dict.fromkeys((case, family) for case, family, _ in keys))
    methods = list(dict.fromkeys(method for _, _, method in keys))
    fig, axes = plt.subplots(len(rows), len(methods), figsize=(2.6 * len(methods), 2.6 * len(rows)), squeeze=False)
    for i, (case_name, family) in enumerate(rows):
        case = get_case(case_name)
        tilted = case.tilt().tilted
        lim = float(case.base.means.abs().max()) + 3 * float(case.base.covs.diagonal(dim1=1, dim2=2).max().sqrt())
        for method in methods:  # widen to show samples that overshoot the target
            x = result.samples.get((case_name, family, method))
            if x is not None:
                lim = max(lim, float(x.abs().quantile(0.995)) * 1.05)
        grid = torch.linspace(-lim, lim, 200, dtype=torch.float64)
        gx, gy = torch.meshgrid(grid, grid, indexing="xy")
        density = tilted.log_prob(torch.stack([gx.flatten(), gy.flatten()], 1)).exp().reshape(gx.shape)
        for j, method in enumerate(methods):
            ax = axes[i][j]
            ax.contourf(gx.numpy(), gy.numpy(), density.sqrt().numpy(), levels=12, cmap="Blues")
            x = result.samples.get((case_name, family, method))
            if x is not None:
                x = x[:max_points].numpy()
                ax.scatter(x[:, 0], x[:, 1], s=1.5, c="tab:red", alpha=0.5, linewidths=0)
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(method, fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{case_name}\n{family}", fontsize=8)
    fig.suptitle("samples (red) over the exact tilted density (blue, sqrt scale)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
