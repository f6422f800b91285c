"""Data-driven initialisation for guides (mixture models decide their fate at initialisation)."""

from __future__ import annotations

import torch

__all__ = ["kmeans"]


def kmeans(x: torch.Tensor, num_clusters: int, *, iterations: int = 20, generator: torch.Generator | None = None):
    """k-means++ seeding (Arthur & Vassilvitskii 2007) followed by Lloyd iterations.

    Returns
    -------
    centers : Tensor (num_clusters, D)
    labels : LongTensor (N,)
    """
    num_points = x.shape[0]
    first = torch.randint(num_points, (1,), generator=generator, device=x.device)
    centers = [x[first[0]]]
    for _ in range(1, num_clusters):
        # next seed drawn with probability proportional to the squared distance to the nearest seed
        squared = torch.cdist(x, torch.stack(centers)).min(dim=1).values.square()
        total = squared.sum()
        weights = squared / total if total > 0 else torch.full_like(squared, 1.0 / num_points)
        centers.append(x[torch.multinomial(weights, 1, generator=generator)[0]])
    centers = torch.stack(centers)
    for _ in range(iterations):
        labels = torch.cdist(x, centers).argmin(dim=1)
        counts = torch.bincount(labels, minlength=num_clusters).unsqueeze(-1)
        sums = torch.zeros_like(centers).index_add_(0, labels, x)
        centers = torch.where(counts > 0, sums / counts.clamp(min=1), centers)  # an empty cluster keeps its center
    return centers, torch.cdist(x, centers).argmin(dim=1)
