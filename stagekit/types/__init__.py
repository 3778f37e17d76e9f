"""The bottom of stagekit: the step messages and the sampling parameters every layer above
speaks (engine, transport, rpc, models). Nothing here imports another stagekit package
but ``stagekit.errors``."""
