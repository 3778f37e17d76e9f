"""Which DeviceCommunicator a group gets (``--collectives``).

``auto`` (the default): NCCL or gloo through torch.distributed when the ranks compute on
GPUs, shared memory when they compute on the CPU of one host — a stage's TP ranks always
do: rank 0 spawns its workers. ``shm`` insists on shared memory (an error on GPUs),
``gloo`` keeps torch.distributed (gloo on the CPU), the fallback and the reference.
"""

from __future__ import annotations

import platform

import torch

from stagekit.errors import ConfigError
from stagekit.kernels.shm_collectives import native_available
from stagekit.parallel.device_communicator import DeviceCommunicator
from stagekit.parallel.shm_group_communicator import ShmGroupCommunicator
from stagekit.parallel.torch_communicator import TorchCommunicator

COLLECTIVES = ("auto", "shm", "gloo")


def shm_usable() -> bool:
    """Shared-memory collectives work here: the native kernel builds, or the torch fallback's
    ordering assumption (x86's total store order) holds."""
    return native_available() or platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")


def communicator_for(collectives: str, device: torch.device) -> type[DeviceCommunicator]:
    """The communicator class for a group on one host whose ranks compute on ``device``."""
    if collectives not in COLLECTIVES:
        raise ConfigError(f"--collectives must be one of {', '.join(COLLECTIVES)}, got {collectives!r}")
    if collectives == "gloo" or (collectives == "auto" and (device.type != "cpu" or not shm_usable())):
        return TorchCommunicator
    if device.type != "cpu":
        raise ConfigError(f"--collectives shm moves host tensors; this stage computes on {device.type}")
    return ShmGroupCommunicator
