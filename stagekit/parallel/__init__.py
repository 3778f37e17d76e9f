"""Process groups, rank layout and TP worker processes of a stage."""

from stagekit.parallel.group import GroupCoordinator, init_tp_group
from stagekit.parallel.layout import StageLayout

__all__ = ["GroupCoordinator", "StageLayout", "init_tp_group"]
