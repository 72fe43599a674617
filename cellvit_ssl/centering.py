"""Sinkhorn-Knopp centering of teacher logits (DINOv2 / SwAV style).

lightly centres DINO and iBOT teacher outputs by a running mean only; DINOv2 replaces that
with a few Sinkhorn-Knopp iterations that turn the teacher logits of a batch into soft
assignments whose prototype marginals are uniform. Under ``torch.distributed`` the batch is
the union of every rank's samples: the sums run over all ranks, so each rank gets exactly the
rows it would get from a single process that saw the concatenated batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce(x: Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> Tensor:
    if _distributed():
        dist.all_reduce(x, op=op)
    return x


@torch.no_grad()
def sinkhorn_knopp(logits: Tensor, temperature: float, n_iterations: int = 3) -> Tensor:
    """Soft assignments ``(B, K)`` of ``B`` samples to ``K`` prototypes with uniform marginals.

    Each row of the result sums to 1 (a target distribution for one sample); after enough
    iterations every column sums to ``B_total / K`` (each prototype used equally), where
    ``B_total`` is the batch size summed over all ranks.

    Args:
        logits: Teacher head outputs ``(B, K)`` of this rank.
        temperature: Teacher temperature; the kernel is ``exp(logits / temperature)``.
        n_iterations: Alternating normalisations (DINOv2 uses 3).

    Returns:
        Float32 tensor ``(B, K)``.

    Examples:
        >>> q = sinkhorn_knopp(torch.randn(8, 4), temperature=0.1, n_iterations=50)
        >>> torch.allclose(q.sum(1), torch.ones(8)), torch.allclose(q.sum(0), torch.full((4,), 2.0))
        (True, True)
    """
    if logits.ndim != 2:
        raise ValueError(f"sinkhorn_knopp expects (B, K) logits, got shape {tuple(logits.shape)}")
    scaled = logits.float() / temperature
    # One global shift for every rank: it cancels in the first normalisation and keeps exp finite.
    # Every rank joins every all_reduce, also one with no rows (e.g. nothing masked for iBOT).
    local_max = scaled.max().reshape(1) if scaled.numel() else scaled.new_full((1,), -torch.inf)
    shift = _all_reduce(local_max, dist.ReduceOp.MAX).clamp_min(torch.finfo(torch.float32).min)
    q = torch.exp(scaled - shift).t()  # (K, B): prototypes x samples
    n_samples = _all_reduce(torch.tensor([q.shape[1]], dtype=torch.float32, device=q.device))
    k = q.shape[0]
    q /= _all_reduce(q.sum().reshape(1))
    for _ in range(n_iterations):
        q /= _all_reduce(q.sum(dim=1, keepdim=True))  # each prototype's mass over the whole batch
        q /= k
        q /= q.sum(dim=0, keepdim=True)  # each sample's mass (local)
        q /= n_samples
    q *= n_samples
    return q.t()
