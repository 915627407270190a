"""Several training processes (one per GPU, or gloo processes on a CPU): launch, ranks, collectives."""

import contextlib
import datetime
import logging
import os
import socket
import sys
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp

from d2retrain.core.errors import D2RetrainError
from d2retrain.core.logutil import configure_logging
from d2retrain.train.job import DistributedSpec

logger = logging.getLogger(__name__)

__all__ = [
    "TIMEOUT",
    "launch",
    "process_main",
    "launch_errors",
    "log_file",
    "rendezvous_url",
    "rank",
    "world_size",
    "local_rank",
    "is_main",
    "barrier",
    "mean_over_ranks",
    "agree",
    "check_in_step",
]

TIMEOUT = datetime.timedelta(minutes=30)  # ranks wait this long for rank 0's evaluations
_local_rank = 0


def rendezvous_url(spec: DistributedSpec) -> str:
    """The ``init_method`` URL: ``spec.dist_url``, or a free port on this machine for ``auto``."""
    if spec.dist_url != "auto":
        return spec.dist_url
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


def launch(function: Callable[..., object], spec: DistributedSpec, *args: object) -> None:
    """Run ``function(*args)`` in ``spec.num_gpus`` processes of a process group, or in this
    process when the world is one process.

    Each process logs to this process's log file, tagged with its rank; NCCL on GPUs, gloo
    on the CPU.

    Raises:
        D2RetrainError: A process stopped on a user error (logged by that process).
    """
    if spec.world_size == 1:
        function(*args)
        return
    url = rendezvous_url(spec)
    logger.info(
        "starting %d training processes (machine %d of %d, %d in all) at %s",
        spec.num_gpus,
        spec.machine_rank,
        spec.num_machines,
        spec.world_size,
        url,
    )
    with launch_errors():
        torch_mp.start_processes(
            _worker,
            args=(function, spec, url, log_file(), args),
            nprocs=spec.num_gpus,
            start_method="spawn",
        )


def _worker(
    local: int,
    function: Callable[..., object],
    spec: DistributedSpec,
    url: str,
    log_file: str | None,
    args: Sequence[object],
) -> None:
    global_rank = spec.machine_rank * spec.num_gpus + local
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=url,
        world_size=spec.world_size,
        rank=global_rank,
        timeout=TIMEOUT,
    )
    try:
        process_main(local, function, log_file, args)
    finally:
        dist.destroy_process_group()


def process_main(
    local: int, function: Callable[..., object], log_file: str | None, args: Sequence[object]
) -> None:
    """Body of one training process: logging tagged with the rank, user errors as exit status 2.

    Args:
        local: The process's rank on this machine.
        function: What the process runs.
        log_file: The job's log file (shared by all processes).
        args: Arguments of ``function``.
    """
    global _local_rank
    _local_rank = local
    configure_logging(log_file, tag=f"rank {rank()}")
    try:
        function(*args)
    except D2RetrainError as error:
        logger.error("%s", error)
        sys.exit(2)


@contextlib.contextmanager
def launch_errors() -> Iterator[None]:
    """Turn a training process that exited on a user error into a :class:`D2RetrainError`."""
    try:
        yield
    except torch_mp.ProcessExitedException as error:
        raise D2RetrainError(
            f"training process {error.error_index} stopped (exit status {error.exit_code}); "
            "its message is in the log above"
        ) from None


def log_file() -> str | None:
    """The file this process logs to (a Snakemake job's log), for the processes it starts."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and handler.baseFilename != os.devnull:
            return handler.baseFilename
    return None


def rank() -> int:
    """This process's global rank (0 outside a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """Processes in the group (1 outside one)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def local_rank() -> int:
    """This process's rank on its machine: the GPU it uses."""
    return _local_rank


def is_main() -> bool:
    """Whether this process writes checkpoints, metrics and evaluations."""
    return rank() == 0


def barrier() -> None:
    """Wait for every process (no-op for one)."""
    if world_size() > 1:
        dist.barrier()


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """The mean of each value over all processes (the same keys on every rank)."""
    if world_size() == 1:
        return values
    names = sorted(values)
    tensor = torch.tensor([values[name] for name in names], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return dict(zip(names, (tensor / world_size()).tolist(), strict=True))


def agree(flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every process (a decision only rank 0 can make, such as stopping)."""
    if world_size() == 1:
        return flag
    tensor = torch.tensor([int(flag)], device=device)
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())


def check_in_step(model: torch.nn.Module, device: torch.device) -> None:
    """Check that every process holds the same weights (data-parallel replicas stay equal).

    Raises:
        RuntimeError: The replicas differ: a bug, not a user error.
    """
    if world_size() == 1:
        return
    with torch.no_grad():
        local = torch.stack([p.detach().double().sum() for p in model.parameters()]).to(device)
    gathered = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(gathered, local)
    if any(not torch.equal(gathered[0], other) for other in gathered[1:]):
        raise RuntimeError("data-parallel replicas diverged: weights differ between ranks")
    logger.info("weights identical on all %d processes", world_size())
