"""Everything of ours that touches ``torch.distributed``: process group, collectives, wrapping, sampling.

(lightly's mean-centring losses all-reduce their centres themselves.)

One process per device, started by ``torchrun`` (single node, multi-node through its
rendezvous) or by SLURM's ``srun`` (one task per GPU); launching is their job, not ours.
Without either, everything here degrades to a single process and no process group.

- :func:`init_distributed` reads the launcher's environment and joins the process group.
- :func:`all_reduce_sum_`, :func:`all_reduce_max_`, :func:`all_reduce_mean` and
  :func:`gather_objects` are the collectives the rest of the package uses (each a no-op, or a
  one-rank answer, without a process group).
- :func:`wrap_model` puts the student/teacher under DDP (default) or FSDP2 (``fully_shard``
  per transformer block).
- :func:`full_state_dict` / :func:`load_full_state_dict` give checkpoint-ready state of model
  and optimizer whatever the wrapping (gathered to full tensors under FSDP).
- :class:`ShardedSampler` gives each rank its own part of the index, in an order that depends
  only on ``(seed, epoch)`` and can start mid-epoch (exact resume).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data.distributed import DistributedSampler

from cellvit_ssl.errors import ConfigError

STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank, the world size and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group with more than one process is in use."""
        return self.world_size > 1


def _env_from_slurm() -> None:
    """Translate ``srun``'s task variables into torch's (RANK, WORLD_SIZE, ...) if absent.

    Only a job step started by ``srun`` counts (``SLURM_STEP_NUM_TASKS``): a batch script
    that runs python directly in an allocation of N tasks is one process, not N.
    """
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    ntasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1"))
    if ntasks <= 1:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = str(ntasks)
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in os.environ:
        nodes = os.environ.get("SLURM_STEP_NODELIST", os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        os.environ["MASTER_ADDR"] = _first_host(nodes)
    if "MASTER_PORT" not in os.environ:
        job = int(os.environ.get("SLURM_JOB_ID", "0"))
        os.environ["MASTER_PORT"] = str(20000 + job % 20000)


def _first_host(nodelist: str) -> str:
    """First host of a SLURM node list such as ``gpu[012-015,020],cpu1`` → ``gpu012``."""
    head = re.split(r",(?![^\[]*\])", nodelist)[0]
    if "[" not in head:
        return head
    prefix, rest = head.split("[", 1)
    return prefix + re.split(r"[,-]", rest.rstrip("]"))[0]


def init_distributed(device: str = "auto", backend: str = "auto", timeout_minutes: int = 30) -> DistInfo:
    """Join the process group the launcher describes, or run as a single process.

    Reads ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (torchrun) or ``SLURM_PROCID`` /
    ``SLURM_STEP_NUM_TASKS`` / ``SLURM_LOCALID`` (srun). Under CUDA each process takes the GPU
    ``LOCAL_RANK``.

    Args:
        device: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        backend: ``auto`` (NCCL on CUDA, gloo on CPU), ``nccl`` or ``gloo``.
        timeout_minutes: Collective timeout (a hung rank fails the job after this long).

    Raises:
        ConfigError: If CUDA is asked for but absent.
    """
    _env_from_slurm()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device={device!r} but CUDA is not available; use train.device=cpu")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes),
                                **({"device_id": dev} if dev.type == "cuda" else {}))
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def cleanup() -> None:
    """Leave the process group (no-op without one)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum_(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks, in place (one ``all_reduce``); returns ``values``."""
    if dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_reduce_max_(values: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over ranks, in place (one ``all_reduce``); returns ``values``."""
    if dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (a copy; the input is left as is)."""
    out = values.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(out)
        out /= dist.get_world_size()
    return out


def gather_objects(obj) -> list:
    """Every rank's ``obj`` as a list indexed by rank (picklable objects)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def wrap_model(meta: nn.Module, info: DistInfo, strategy: str = "ddp", bf16: bool = False) -> nn.Module:
    """Wrap the student/teacher meta-architecture for data-parallel training.

    Args:
        meta: The :class:`~cellvit_ssl.ssl.DINOMetaArch` (on ``info.device``); its
            ``transformer_blocks()``, ``backbones()`` and ``heads()`` are the units sharded.
        info: From :func:`init_distributed`.
        strategy: ``ddp`` (replicated weights, averaged gradients) or ``fsdp`` (FSDP2: each
            transformer block (hierarchical attention's cross-channel blocks included), each
            backbone and each head sharded over the ranks; the teacher is sharded like the
            student, so the EMA update runs shard by shard).
        bf16: Under FSDP, compute in bf16 and reduce gradients in fp32.

    Returns:
        The module to call in the training loop: ``meta`` itself for a single process, else
        the wrapper (which shares ``meta``'s parameters).

    Raises:
        ConfigError: On an unknown strategy.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"train.strategy={strategy!r}; expected one of {list(STRATEGIES)}")
    if not info.distributed:
        return meta
    if strategy == "ddp":
        device_ids = [info.device.index] if info.device.type == "cuda" else None
        # lightly's mean-centring losses all-reduce their centre: no buffer broadcast needed. Some
        # parameters take no part in some steps (the mask token without iBOT masks, absent
        # channels' embeddings), hence find_unused_parameters.
        return nn.parallel.DistributedDataParallel(meta, device_ids=device_ids, broadcast_buffers=False,
                                                   find_unused_parameters=True)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs = {"mesh": mesh, **({"mp_policy": policy} if policy is not None else {})}
    for block in meta.transformer_blocks():
        fully_shard(block, **kwargs)
    for net in meta.backbones():
        fully_shard(net, **kwargs)
        # The objective calls forward_features, not forward: FSDP must gather around it too.
        register_fsdp_forward_method(net, "forward_features")
        register_fsdp_forward_method(net, "embed")
    for head in meta.heads():
        fully_shard(head, **kwargs)
    fully_shard(meta, **kwargs)
    return meta


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (FSDP2 shards in place, so nothing to unwrap)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def no_sync(model: nn.Module, skip: bool):
    """Context that skips the gradient all-reduce of a non-final accumulation micro-step."""
    if not skip:
        return nullcontext()
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        return _FSDPNoSync(model)
    return nullcontext()


class _FSDPNoSync:
    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.model.set_requires_gradient_sync(False)

    def __exit__(self, *exc) -> None:
        self.model.set_requires_gradient_sync(True)


def full_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full (unsharded, CPU) state of model and optimizer, keyed by parameter name.

    Works the same for a plain module, DDP and FSDP2, so a checkpoint written under one can
    be resumed under another. Under FSDP every rank must call it (it gathers shards).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    sharded = dist.is_initialized() and _is_fsdp(model)
    options = StateDictOptions(full_state_dict=True, cpu_offload=sharded)
    return get_state_dict(unwrap(model), optimizer, options=options)


def full_model_state_dict(model: nn.Module) -> dict:
    """Full (unsharded, CPU under FSDP) model state keyed by parameter name (all ranks call)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sharded = dist.is_initialized() and _is_fsdp(model)
    return get_model_state_dict(unwrap(model), options=StateDictOptions(full_state_dict=True, cpu_offload=sharded))


def load_full_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                         model_state: dict, optim_state: dict | None) -> None:
    """Load what :func:`full_state_dict` returned (into a plain, DDP or FSDP2 model).

    Raises:
        ValueError: If the model has parameters or buffers the state lacks, or the state has
            entries the model lacks (``set_model_state_dict`` with full state dicts lets
            missing ones through even when strict, leaving them at their initial values).
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    expected = set(unwrap(model).state_dict())
    missing, unexpected = sorted(expected - set(model_state)), sorted(set(model_state) - expected)
    if missing or unexpected:
        raise ValueError(f"the saved model state lacks {len(missing)} entries of this model {missing[:3]} and has "
                       f"{len(unexpected)} it does not know {unexpected[:3]}")
    set_model_state_dict(unwrap(model), model_state, options=StateDictOptions(full_state_dict=True, strict=True))
    if optimizer is not None and optim_state is not None:
        # Not strict: a parameter that never had a gradient yet (mask token without iBOT, the
        # head's last layer while frozen) has no optimizer state to restore.
        set_optimizer_state_dict(unwrap(model), optimizer, optim_state,
                                 options=StateDictOptions(full_state_dict=True, strict=False))
        # Loading first initialises the state of every parameter (a zero-lr step); a parameter
        # without saved state must start fresh as in the uninterrupted run (Adam's step count).
        saved = optim_state.get("state", {})
        for name, param in unwrap(model).named_parameters():
            if name not in saved:
                optimizer.state.pop(param, None)


def _is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def grad_norm_value(norm: torch.Tensor) -> torch.Tensor:
    """A total gradient norm as a plain tensor (FSDP returns a DTensor)."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


class ShardedSampler(DistributedSampler):
    """This rank's share of a shuffled index, resumable mid-epoch.

    The permutation depends only on ``(seed, epoch)`` (as in ``DistributedSampler``), rank
    ``r`` of ``W`` takes positions ``r, r + W, ...``, so step ``k`` of a run with ``W`` ranks
    and per-rank batch ``b`` sees exactly the samples that step ``k`` of a single process with
    batch ``W·b`` sees. Items are ``(epoch, index)`` pairs so that the dataset can seed each
    sample's augmentations from them, whichever worker or rank loads it.

    Args:
        dataset: The map-style dataset.
        info: From :func:`init_distributed`.
        seed: Shuffle seed (the run's ``train.seed``).
    """

    def __init__(self, dataset, info: DistInfo, seed: int) -> None:
        super().__init__(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                         seed=seed, drop_last=True)
        self.skip = 0

    def set_position(self, epoch: int, skip: int = 0) -> None:
        """Start the next iteration at ``epoch``, leaving out this rank's first ``skip`` samples."""
        self.set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        for i in list(super().__iter__())[self.skip:]:
            yield epoch, i

    def __len__(self) -> int:
        return self.num_samples - self.skip
