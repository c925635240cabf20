"""Process-group helpers: the same script runs under `torchrun` (any number of processes/nodes) or as a plain
single process, in the style of NVlabs/edm2 `torch_utils/distributed.py`."""
import os

import torch
import torch.distributed as dist


def init() -> torch.device:
    """Joins the process group when launched by torchrun (RANK/WORLD_SIZE set); gloo on CPU, nccl on GPU.

    torch._dynamo is imported before the group exists, not lazily by the first DistributedDataParallel: imported
    while a group exists, it keeps references to that group, so `shutdown` cannot free it and the group's gloo threads
    outlive the interpreter, where they can abort the process at exit (rarely: "terminate called without an active
    exception", SIGABRT) and turn a finished run into a failed one."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        from torch import _dynamo  # noqa: F401  (costs ~1.5 s, so only for multi-process runs)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (returns a new tensor; single-process: a copy)."""
    value = value.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= get_world_size()
    return value


def broadcast_object(obj):
    """Rank 0's Python object on every rank (e.g. the resume decision, so ranks never disagree)."""
    if not dist.is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@torch.no_grad()
def check_consistency(module: torch.nn.Module) -> None:
    """Raises if any parameter or buffer differs from rank 0's (DDP must keep replicas bit-identical)."""
    if not dist.is_initialized():
        return
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        reference = tensor.detach().clone()
        dist.broadcast(reference, src=0)
        if not torch.equal(reference, tensor.detach()):
            raise RuntimeError(f"rank {get_rank()} is out of sync with rank 0 at {name}")
