"""Improved precision and recall (Kynkäänniemi et al. 2019), as torch-fidelity computes them.

Each set of features spans a manifold estimate: the union of balls around its points, each ball's radius
the distance to that point's k-th nearest neighbour in its own set (k = 3 in the paper and in
torch-fidelity). For generated features G and real features R,

    precision = |{g ∈ G : g lies in R's manifold}| / |G|      (how many samples look real),
    recall    = |{r ∈ R : r lies in G's manifold}| / |R|      (how much of the data is covered),
    f_score   = 2 · precision · recall / max(1e-5, precision + recall).

The counting is torch-fidelity's ``calculate_precision_recall_part`` (``metric_prc.py``: Euclidean
``torch.cdist`` in row blocks, radii by ``kthvalue(k + 1)`` so that a point's zero distance to itself is
skipped, "inside" meaning ≤), called here, so the numbers are torch-fidelity's ``precision``, ``recall``
and ``f_score`` with ``input1 = generated``, ``input2 = real``. Its features are
VGG-16 fc2 (:class:`~diffusionflow.metrics.extractors.VGG16`, torch-fidelity's default for this metric).
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["precision_recall"]


def precision_recall(
    generated: Tensor, real: Tensor, k: int = 3, batch_size: int = 10_000
) -> dict[str, float]:
    """``{"precision", "recall", "f_score"}`` of ``generated`` against ``real`` features (N, dim), with
    k-th-nearest-neighbour radii; ``batch_size`` rows of distances are held at a time (memory only)."""
    from torch_fidelity.metric_prc import calculate_precision_recall_part

    if generated.ndim != 2 or real.ndim != 2 or generated.shape[1] != real.shape[1]:
        raise ValueError(
            f"features must be (N, dim) with one dim, got {tuple(generated.shape)} and {tuple(real.shape)}"
        )
    if not 1 <= k < min(len(generated), len(real)):
        raise ValueError(
            f"k = {k} nearest neighbours need more than k points in each set: k must be in "
            f"[1, {min(len(generated), len(real)) - 1}] for sets of {len(generated)} and {len(real)}"
        )
    precision, recall = calculate_precision_recall_part(generated, real, k, batch_size)
    return {
        "precision": precision,
        "recall": recall,
        "f_score": 2 * precision * recall / max(1e-5, precision + recall),
    }
