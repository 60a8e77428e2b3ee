"""What the optimizer needs from torch.distributed when parameters are DTensor shards (FSDP2).

The Neumann regularizer uses the norm of ``w - v`` over a whole parameter group. Under FSDP2
each rank holds a shard of every parameter, so the local sum of squares must be summed over the
mesh dimensions on which the parameters are sharded. Everything goes through
``torch.distributed`` collectives on the DTensor's own device mesh; nothing here runs when no
parameter is a DTensor.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

try:  # DTensor is public from torch 2.5 on
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = None  # type: ignore[assignment,misc]
    Shard = None  # type: ignore[assignment,misc]


def is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local_tensor(t: Tensor) -> Tensor:
    """The local shard of a DTensor, or the tensor itself."""
    return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined]


def _sharding(params: list[Tensor]) -> tuple[Any, list[int]] | None:
    """The common device mesh of the DTensor params and the mesh dims they are sharded on."""
    dts = [p for p in params if is_dtensor(p)]
    if not dts:
        return None
    if len(dts) != len(params):
        raise NotImplementedError(
            "Neumann: a parameter group mixes DTensor and plain tensors; put them in separate groups"
        )
    mesh = dts[0].device_mesh  # type: ignore[attr-defined]
    dims = [i for i, pl in enumerate(dts[0].placements) if isinstance(pl, Shard)]  # type: ignore[attr-defined]
    for p in dts[1:]:
        pdims = [i for i, pl in enumerate(p.placements) if isinstance(pl, Shard)]  # type: ignore[attr-defined]
        if p.device_mesh != mesh or pdims != dims:  # type: ignore[attr-defined]
            raise NotImplementedError(
                "Neumann: the DTensor parameters of one group must share one device mesh and "
                "be sharded on the same mesh dimensions; put differently sharded parameters "
                "in separate groups"
            )
    return mesh, dims


def all_reduce_squared_norm(sq: Tensor, params: list[Tensor]) -> Tensor:
    """Sum a local sum of squares over the shards of DTensor ``params`` (no-op otherwise)."""
    sharding = _sharding(params)
    if sharding is None:
        return sq
    mesh, dims = sharding
    sq = sq.to(local_tensor(params[0]).device)
    for d in dims:
        dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=mesh.get_group(d))
    return sq


def all_ranks_true(flag: bool, params: list[Tensor]) -> bool:
    """True only if ``flag`` holds on every rank that shares the DTensor ``params``."""
    sharding = _sharding(params)
    if sharding is None:
        return flag
    mesh, _ = sharding
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=local_tensor(params[0]).device)
    for d in range(mesh.ndim):
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=mesh.get_group(d))
    return bool(t.item())
