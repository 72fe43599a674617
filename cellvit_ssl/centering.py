"""Sinkhorn-Knopp centering of teacher logits (DINOv2 / SwAV style).

lightly centres DINO and iBOT teacher outputs by a running mean only; DINOv2 replaces that
with a few Sinkhorn-Knopp iterations that turn the teacher logits of a batch into soft
assignments whose prototype marginals are uniform. Under ``torch.distributed`` the batch is
the union of every rank's samples: the sums run over all ranks, so each rank gets exactly the
rows it would get from a single process that saw the concatenated batch.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce(x: Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> Tensor:
    if _distributed():
        dist.all_reduce(x, op=op)
    return x


def _logsumexp(x: Tensor, dim: int | None, across_ranks: bool) -> Tensor:
    """``log(sum(exp(x)))`` over ``dim`` (all elements when None), optionally over all ranks.

    Every rank takes part in the collectives, also one holding no elements.
    """
    dims = tuple(range(x.ndim)) if dim is None else (dim,)
    if x.numel():
        m = x.amax(dim=dims, keepdim=True)
    else:
        m = x.new_full([1 if d in dims else s for d, s in enumerate(x.shape)], -torch.inf)
    if across_ranks:
        m = _all_reduce(m, dist.ReduceOp.MAX)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.exp(x - m).sum(dim=dims, keepdim=True)
    if across_ranks:
        s = _all_reduce(s)
    return m + torch.log(s)


@torch.no_grad()
def sinkhorn_knopp(logits: Tensor, temperature: float, n_iterations: int = 3) -> Tensor:
    """Soft assignments ``(B, K)`` of ``B`` samples to ``K`` prototypes with uniform marginals.

    Each row of the result sums to 1 (a target distribution for one sample); after enough
    iterations every column sums to ``B_total / K`` (each prototype used equally), where
    ``B_total`` is the batch size summed over all ranks. The alternating normalisations of
    DINOv2's ``sinkhorn_knopp_teacher`` run in the log domain, so large logits or small
    temperatures neither overflow nor leave a prototype with zero mass.

    Args:
        logits: Teacher head outputs ``(B, K)`` of this rank.
        temperature: Teacher temperature; the kernel is ``exp(logits / temperature)``.
        n_iterations: Alternating normalisations (DINOv2 uses 3).

    Returns:
        Float32 tensor ``(B, K)``.

    Examples:
        >>> q = sinkhorn_knopp(torch.randn(8, 4), temperature=1.0, n_iterations=100)
        >>> torch.allclose(q.sum(1), torch.ones(8)), torch.allclose(q.sum(0), torch.full((4,), 2.0), atol=1e-4)
        (True, True)
    """
    if logits.ndim != 2:
        raise ValueError(f"sinkhorn_knopp expects (B, K) logits, got shape {tuple(logits.shape)}")
    log_q = (logits.float() / temperature).t()  # (K, B): prototypes x samples
    k = log_q.shape[0]
    n_samples = _all_reduce(torch.tensor([float(log_q.shape[1])], device=log_q.device))
    log_q = log_q - _logsumexp(log_q, None, across_ranks=True)
    for _ in range(n_iterations):
        # each prototype's mass over the whole batch (all ranks), then each sample's (local)
        log_q = log_q - _logsumexp(log_q, 1, across_ranks=True) - math.log(k)
        log_q = log_q - _logsumexp(log_q, 0, across_ranks=False) - torch.log(n_samples)
    return torch.exp(log_q + torch.log(n_samples)).t()
