"""Process-group set-up and the one place where features are gathered across ranks.

Everything here works unchanged in a single plain process (no process group): rank 0, world size 1,
gathers return their input. Under `torchrun` the group is created from the environment
(gloo on CPU, NCCL on GPU).

Which gathers carry gradient, and why:
- ITC features (`gather(..., with_grad=True)`): each rank scores its own rows against the whole
  global batch, and the gather's backward sends every rank's gradient back to the rank that owns the
  features. With DDP's gradient averaging this gives exactly the gradient of one process holding the
  whole batch (tested under torchrun). LAVIS gathers ITC features without gradient, which drops the
  gradient that flows through the gathered copies (its own rows included); with no process group at all
  both are the same (tests/training/test_lavis_parity.py pins both facts).
- ITM hard-negative images (`with_grad=True`, as in LAVIS): a negative image from another rank
  still trains the Q-Former that produced its features.
- Token ids, masks and image ids (`with_grad=False`): integers, nothing to differentiate.
"""

from __future__ import annotations

import gc
import os
from datetime import timedelta

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def setup(device_preference: str = "auto") -> torch.device:
    """Join the process group when launched by torchrun; pick this process's device."""
    use_cuda = torch.cuda.is_available() and device_preference in ("auto", "cuda")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not is_distributed():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=30))
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def teardown() -> None:
    """Leave the process group. Callers drop their DistributedDataParallel wrapper first: freed after the
    group, its reducer destroys the gloo group itself, joining gloo's threads while holding the GIL that a
    thread freeing a finished all-reduce's tensors waits for (a hang at exit, seen in 3 of 6 runs)."""
    if is_distributed():
        gc.collect()  # a dropped DDP wrapper sits in reference cycles: free it while the group still lives
        # Every rank waits until all are done (rank 0 may still be writing the model): a rank that
        # destroyed the group while rank 0, which hosts the rendezvous store, was exiting hung for good.
        dist.barrier()
        dist.destroy_process_group()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns to each rank the sum, over all ranks, of the gradient of its rows.

    torch.distributed.nn.functional.all_gather does this through a scatter on gloo that scrambles
    non-contiguous gradients (what einsum's backward hands it); summing a contiguous copy is plain.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rows = tensor.shape[0]
        parts = [torch.empty_like(tensor, memory_format=torch.contiguous_format) for _ in range(world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad[rank() * ctx.rows : (rank() + 1) * ctx.rows]


def gather(tensor: torch.Tensor, with_grad: bool) -> torch.Tensor:
    """Concatenate `tensor` from every rank along dim 0, in rank order."""
    if not is_distributed():
        return tensor
    if with_grad:
        return _GatherWithGrad.apply(tensor)
    parts = [torch.empty_like(tensor, memory_format=torch.contiguous_format) for _ in range(world_size())]
    dist.all_gather(parts, tensor.detach().contiguous())
    return torch.cat(parts, dim=0)


def pad_to_global_length(*tensors_and_pads: tuple[torch.Tensor, int]) -> list[torch.Tensor]:
    """Right-pad (batch, length) tensors of one length (token ids, their mask) to the longest length on any
    rank, so they can be gathered; one all-reduce for all of them."""
    first = tensors_and_pads[0][0]
    length = torch.tensor([first.shape[1]], device=first.device)
    if is_distributed():
        dist.all_reduce(length, op=dist.ReduceOp.MAX)
    extra = int(length.item()) - first.shape[1]
    return [torch.nn.functional.pad(t, (0, extra), value=pad) for t, pad in tensors_and_pads]


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average logged scalars over ranks, so the log shows the global figure."""
    if not is_distributed():
        return values
    stacked = torch.tensor(list(values.values()), device=device, dtype=torch.float64)
    dist.all_reduce(stacked)
    return dict(zip(values, (stacked / world_size()).tolist(), strict=True))
