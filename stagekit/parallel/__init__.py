"""Process groups and their collectives, and the rank layout math of a stage."""

from stagekit.parallel.device_communicator import DeviceCommunicator
from stagekit.parallel.group import GroupCoordinator
from stagekit.parallel.layout import StageLayout
from stagekit.parallel.parallel_groups import ParallelGroups
from stagekit.parallel.parallel_world import ParallelWorld
from stagekit.parallel.torch_communicator import TorchCommunicator

__all__ = ["DeviceCommunicator", "GroupCoordinator", "ParallelGroups", "ParallelWorld", "StageLayout",
           "TorchCommunicator"]
