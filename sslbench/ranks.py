"""The ranks of a ``torch.distributed`` process group, as one explicit value handed to the stages that
need it.

No stage reads ``torch.distributed`` behind the caller's back: a :class:`Ranks` is built once, where the
caller's situation is known (:meth:`Ranks.of_process_group` in :func:`sslbench.evaluate_model` and in
``torchrun -m sslbench extract``), and passed on. What a stage does with it is stated where it takes it:
the extraction embeds this rank's contiguous shard of a split (:func:`sslbench.extract.extract_split`),
the torch k-means treats its input as this rank's shard of the rows
(:class:`~sslbench.interfaces.ClustererConfig` ``ranks``). The default, :data:`ONE_PROCESS`, is a single
process holding every row, whatever process group exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class Ranks:
    """This process's place among ``world`` processes; ``group`` is the ``torch.distributed`` process
    group they share (``None``: the default group, or no group at all when ``world`` is 1)."""

    rank: int = 0
    world: int = 1
    group: Any = None

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} outside a world of {self.world}")

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @classmethod
    def of_process_group(cls, group: Any = None) -> Ranks:
        """The caller's ranks in ``group`` (default: the default group) when ``torch.distributed`` is
        initialised, else one process."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return ONE_PROCESS
        return cls(dist.get_rank(group), dist.get_world_size(group), group)

    def transport_device(self) -> str:
        """Where tensors exchanged between the ranks live: NCCL moves CUDA tensors only (on the
        device this rank has set), the other backends CPU ones."""
        import torch
        import torch.distributed as dist

        if dist.get_backend(self.group) == "nccl":
            return f"cuda:{torch.cuda.current_device()}"
        return "cpu"

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier(group=self.group)

    def sum_(self, tensor: Tensor) -> Tensor:
        """All-reduce ``tensor`` in place by a sum (a no-op on one process)."""
        if not self.distributed:
            return tensor
        import torch.distributed as dist

        moved = tensor.to(self.transport_device())
        dist.all_reduce(moved, group=self.group)
        if moved is not tensor:
            tensor.copy_(moved)
        return tensor

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        """Every rank's ``tensor`` (all of the same shape), in rank order, on the CPU."""
        if not self.distributed:
            return [tensor.cpu()]
        import torch
        import torch.distributed as dist

        moved = tensor.to(self.transport_device()).contiguous()
        parts = [torch.zeros_like(moved) for _ in range(self.world)]
        dist.all_gather(parts, moved, group=self.group)
        return [part.cpu() for part in parts]

    def all_gather_object(self, value: Any) -> list[Any]:
        """Every rank's picklable ``value``, in rank order."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, value, group=self.group)
        return gathered

    def broadcast_object(self, value: Any, src: int = 0) -> Any:
        """Rank ``src``'s picklable ``value`` on every rank."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        box = [value if self.rank == src else None]
        dist.broadcast_object_list(box, src=self.global_rank(src), group=self.group)
        return box[0]

    def global_rank(self, rank: int) -> int:
        """The default group's number of this group's ``rank`` (what ``src``/``dst`` arguments take)."""
        if self.group is None:
            return rank
        import torch.distributed as dist

        return int(dist.get_global_rank(self.group, rank))


#: One process holding every row: what a stage assumes unless handed other ranks.
ONE_PROCESS = Ranks()
