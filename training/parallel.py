"""Data × sequence parallelism: the 2-D rank layout, and sequence parallelism switched on under FSDP2.

World = dp × sp ranks. Ranks r = d * sp + s (s = 0..sp-1) form one sequence group: consecutive ranks, so on
nodes of 8 GPUs a group of 8 stays on one node's NVLink. The ranks of one group read the same batches (the
data streams are split over dp only) and draw the same random numbers (t, noise, condition dropout: one
generator per data rank), and split that batch's tokens (model.sp). FSDP2 shards the weights over all
dp × sp ranks and averages gradients over all of them; model.sp makes each rank's gradient P times its share
of its group's gradient, so that average is the mean over the data axis of the one-rank gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from model.sp import SeqParallel


@dataclass(frozen=True)
class Layout:
    """Where this rank sits in the dp × sp grid."""

    rank: int = 0
    world_size: int = 1
    sp_degree: int = 1

    def __post_init__(self):
        if self.sp_degree < 1 or self.world_size % self.sp_degree:
            raise ValueError(f"sp_degree={self.sp_degree} must divide the {self.world_size} ranks")

    @property
    def dp_size(self) -> int:
        """Data-parallel replicas: how many different batches one step sees."""
        return self.world_size // self.sp_degree

    @property
    def dp_rank(self) -> int:
        """This rank's data stream (and random stream): the same on every rank of a sequence group."""
        return self.rank // self.sp_degree

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp_degree

    def sp_ranks(self) -> list[int]:
        """The global ranks of this rank's sequence group."""
        first = self.dp_rank * self.sp_degree
        return list(range(first, first + self.sp_degree))


def sequence_group(layout: Layout, device: torch.device) -> SeqParallel:
    """The (dp, sp) device mesh's sequence group of this rank (collective: every rank calls it)."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (layout.dp_size, layout.sp_degree), mesh_dim_names=("dp", "sp"))
    sp = SeqParallel(mesh.get_group("sp"))
    if dist.get_process_group_ranks(sp.group) != layout.sp_ranks():
        raise RuntimeError(f"mesh sequence group {dist.get_process_group_ranks(sp.group)} != {layout}")
    return sp


def enable_sequence_parallel(model: torch.nn.Module, layout: Layout, device: torch.device) -> SeqParallel:
    """Split the (possibly FSDP2- or DDP-wrapped) model's tokens over this rank's sequence group."""
    net = getattr(model, "module", model)  # DDP keeps the network in .module; FSDP2 is the network
    if not hasattr(net, "set_sequence_parallel"):
        raise ValueError(f"{type(net).__name__} has no sequence-parallel mode")
    sp = sequence_group(layout, device)
    net.set_sequence_parallel(sp)
    return sp
