"""Sinkhorn-Knopp centering of teacher logits (DINOv2 / SwAV style).

lightly centres DINO and iBOT teacher outputs by a running mean only; DINOv2 replaces that
with a few Sinkhorn-Knopp iterations that turn the teacher logits of a batch into soft
assignments whose prototype marginals are uniform. Under ``torch.distributed`` the batch is
the union of every rank's samples: the prototype sums run over all ranks (through
:mod:`cellvit_ssl.distributed`), so each rank gets exactly the rows it would get from a single
process that saw the concatenated batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from cellvit_ssl.distributed import all_reduce_max_, all_reduce_sum_


@torch.no_grad()
def sinkhorn_knopp(logits: Tensor, temperature: float, n_iterations: int = 3) -> Tensor:
    """Soft assignments ``(B, K)`` of ``B`` samples to ``K`` prototypes with uniform marginals.

    Each row of the result sums to 1 (a target distribution for one sample); after enough
    iterations every column sums to ``B_total / K`` (each prototype used equally), where
    ``B_total`` is the batch size summed over all ranks. The alternating normalisations of
    DINOv2's ``sinkhorn_knopp_teacher`` run in the log domain, so large logits or small
    temperatures neither overflow nor leave a prototype with zero mass.

    Under ``torch.distributed`` this issues ``n_iterations + 1`` all-reduces (see
    :func:`sinkhorn_knopp_jointly`, which solves several problems with the same number).

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
    return sinkhorn_knopp_jointly([logits], temperature, n_iterations)[0]


@torch.no_grad()
def sinkhorn_knopp_jointly(logits: Sequence[Tensor], temperature: float, n_iterations: int = 3) -> list[Tensor]:
    """:func:`sinkhorn_knopp` of several independent problems that share their collectives.

    Each tensor of ``logits`` (e.g. the DINO CLS targets ``(B, K)`` and the iBOT patch targets
    ``(M, K')``) is centred on its own, exactly as :func:`sinkhorn_knopp` would; the problems
    only travel together, so that every rank takes part in ``n_iterations + 1`` all-reduces in
    all, whatever the number of problems:

    - one element-wise maximum of each prototype's logit over the whole batch, which the first
      prototype normalisation subtracts so that no ``exp`` overflows and no prototype is left
      with zero mass;
    - one sum per prototype normalisation (``n_iterations`` of them) over the whole batch.

    The sample normalisations are local (a sample lives on one rank), and the total mass and
    the global batch size that DINOv2 divides by cancel out, so they take no collective.

    Args:
        logits: Teacher head outputs ``(B_i, K_i)`` of this rank, one tensor per problem.
        temperature: Teacher temperature; the kernel is ``exp(logits / temperature)``.
        n_iterations: Alternating normalisations (DINOv2 uses 3).

    Returns:
        One float32 tensor ``(B_i, K_i)`` per problem, rows summing to 1.

    Raises:
        ValueError: If a tensor is not 2-D or ``n_iterations < 1``.
    """
    for x in logits:
        if x.ndim != 2:
            raise ValueError(f"sinkhorn_knopp expects (B, K) logits, got shape {tuple(x.shape)}")
    if n_iterations < 1:
        raise ValueError(f"sinkhorn_knopp needs at least one iteration, got {n_iterations}")
    # (K, B) per problem: prototypes x samples, in the log domain (a new tensor, not the input)
    log_q = [(x.float() / temperature).t() for x in logits]
    widths = [q.shape[0] for q in log_q]

    # Per-prototype maxima over the whole batch (-inf on a rank without samples).
    local_max = [q.amax(dim=1) if q.shape[1] else q.new_full((q.shape[0],), -torch.inf) for q in log_q]
    shift = all_reduce_max_(torch.cat(local_max)).split(widths)
    shift = [torch.where(torch.isfinite(m), m, torch.zeros_like(m)).unsqueeze(1) for m in shift]
    # In place from here on: a (K, B) matrix of iBOT patch targets can take gigabytes.
    for q, m in zip(log_q, shift):
        q.sub_(m)  # every entry <= 0, the largest of each row 0
    for _ in range(n_iterations):
        # Each prototype's mass over the whole batch, a float32 sum of exps that neither overflows
        # nor vanishes: every entry is <= 0, so the mass is at most B_total; it is at least 1 in
        # the first iteration (the row maximum is exp(0)) and at least 1 / K later (the prototype
        # normalisation leaves a total mass of 1, so each sample normalisation divides by <= 1).
        mass = all_reduce_sum_(torch.cat([q.exp().sum(dim=1) for q in log_q])).split(widths)
        for q, m in zip(log_q, mass):
            q.sub_((m.log() + math.log(q.shape[0])).unsqueeze(1))
            # Each sample's mass (local): columns sum to 1.
            q.sub_(torch.logsumexp(q, dim=0, keepdim=True))
    return [q.exp_().t() for q in log_q]
