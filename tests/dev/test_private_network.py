"""The emulated private network of `tenantdb dev`: a machine's request to another machine
pays the latency between their regions, each way, for every chunk of the answer."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from tenantdb.dev.private_network import PREFIX, PrivateNetwork
from tenantdb.dev.processes import MachineStatus
from tenantdb.dev.regions import RegionLatency
from tests.support.servers import LoopbackServer, serve_in_thread
from tests.support.streamed_lines import assert_each_line_crossed, line_arrivals, two_lines

LEG = 0.2  # seconds each way between ams and fra


def streaming_machine(sent: list[float]) -> Starlette:
    """A machine whose answer is ``two_lines``; ``sent`` gets the time each line left."""

    async def lines(request: Request) -> StreamingResponse:
        return two_lines(sent)

    return Starlette(routes=[Route("/lines", lines)])


@contextlib.asynccontextmanager
async def serving(network: PrivateNetwork) -> AsyncIterator[str]:
    """``network`` under uvicorn on this test's loop (it is bound to it); its URL."""
    server = LoopbackServer(network)
    task = asyncio.create_task(server.serve(sockets=[server.socket]))
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        yield server.url
    finally:
        server.should_exit = True
        await task


async def test_each_line_of_a_streamed_answer_crosses_the_regions_latency() -> None:
    sent: list[float] = []
    with serve_in_thread(streaming_machine(sent)) as machine_url:
        port = int(machine_url.rsplit(":", 1)[1])
        machine = MachineStatus("f1", "acme", "fra", "started", port, None)
        network = PrivateNetwork(lambda: [machine], latency=RegionLatency(LEG))
        async with (
            network,
            serving(network) as url,
            httpx.AsyncClient(trust_env=False, timeout=10) as client,
        ):
            asked = time.monotonic()
            async with client.stream("GET", f"{url}{PREFIX}ams/f1/lines") as answer:
                assert answer.status_code == 200
                came = await line_arrivals(answer)
    # The request crossed once before the machine sent anything; each line crossed back.
    assert sent[0] - asked >= LEG - 0.01
    assert_each_line_crossed(sent, came, LEG)
