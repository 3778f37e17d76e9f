from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.gateway.fake_stage import FakeStage, StageHost
from tests.gateway.harness import GatewayThread


@pytest.fixture(scope="session")
def stage_host() -> Iterator[StageHost]:
    host = StageHost()
    yield host
    host.close()


@pytest.fixture(scope="session")
def replica(stage_host: StageHost) -> list[str]:
    """One replica of two fake stages, shared by the session's gateway."""
    return stage_host.start_replica(2)


@pytest.fixture(scope="session")
def gateway(replica: list[str]) -> Iterator[GatewayThread]:
    with GatewayThread([replica]) as gw:
        yield gw


@pytest.fixture()
def head(stage_host: StageHost, replica: list[str]) -> Iterator[FakeStage]:
    """The shared replica's head, with its knobs reset after the test."""
    stage = stage_host.stages[replica[0]]
    yield stage
    stage.token_delay_s, stage.fail_next, stage.fail_after = 0.0, None, None


@pytest.fixture()
def client(gateway: GatewayThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=10) as c:
        yield c
