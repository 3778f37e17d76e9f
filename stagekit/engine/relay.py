"""What a stage that is not the replica head does: take step frames from upstream, run
its layers, pass the step on (or, on the last stage, send the sampled tokens back to the
head). Result frames passing through are forwarded unchanged; a failed step becomes a
result frame with an error so the head fails exactly that step's requests."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from stagekit.engine.stage_runtime import StageRuntime
from stagekit.transport.base import Transport
from stagekit.types.step import Frame, IntermediateTensors, StepInputs, StepResult

log = logging.getLogger(__name__)


class StageRelay:
    def __init__(self, runtime: StageRuntime, transport: Transport, pool: ThreadPoolExecutor) -> None:
        self.runtime, self.transport, self.pool = runtime, transport, pool
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="stage-relay")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            frame = await self.transport.recv()
            if frame.step is None:
                await self._send(frame)
                continue
            header = frame.step
            inter = IntermediateTensors(frame.tensors[0], frame.tensors[1]) if frame.tensors else None
            step = StepInputs(header, intermediate=inter)
            try:
                out = await loop.run_in_executor(self.pool, self.runtime.process, step)
            except Exception as e:
                log.exception("step %d failed on this stage", header.step_id)
                await self._send(Frame(result=StepResult(header.step_id, [], [], [], error=str(e))))
                continue
            if isinstance(out, StepResult):
                await self._send(Frame(result=out))
            else:
                tensors = [] if out is None else [out.hidden_states, out.residual]
                await self._send(Frame(step=header, tensors=tensors))

    async def _send(self, frame: Frame) -> None:
        try:
            await self.transport.send(frame)
        except Exception as e:  # the head times the step out and fails its requests
            log.error("could not pass step on: %s", e)
