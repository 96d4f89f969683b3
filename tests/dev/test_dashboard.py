"""The `tenantdb dev` dashboard in a real headless browser: kill a tenant's holder with its
button and watch the standby take over; start the killed machine again as a standby.

Set ``DASHBOARD_SCREENSHOT=docs/dashboard.png`` to save the page after the takeover (the
README's picture is made so)."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from playwright.async_api import BrowserContext, Locator, Page, async_playwright, expect

from tenantdb.dev.cluster import Cluster, ClusterConfig

pytestmark = pytest.mark.usefixtures("clean_environment")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# No internet here: nothing in the browser may try to reach out.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TAKEOVER = 30_000  # ms: the lease (3 s) expires, then the standby's next poll takes it


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[BrowserContext]:
    if CHROMIUM is None:
        pytest.skip(
            "the dashboard's browser test needs chromium on PATH (Debian's package, driven by "
            "Playwright): `make chromium` installs it as root, else `sudo apt-get install "
            "chromium`"
        )
    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            tmp_path / "chromium-profile",
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1100, "height": 720},
        )
        try:
            yield context
        finally:
            await context.close()


def machine_field(page: Page, machine_id: str, field: str) -> Locator:
    return page.locator(f'tr[data-machine="{machine_id}"] td[data-field="{field}"]')


@pytest.mark.long
async def test_killing_the_holder_on_the_dashboard_shows_the_standby_take_over(
    tmp_path: Path, browser: BrowserContext
) -> None:
    config = ClusterConfig(
        tenants=("100",),
        machines_per_tenant=2,
        port=0,
        state_dir=tmp_path / "state",
        kill_timeout=10,
        env={"TENANTDB_LEASE_TTL": "3"},
    )
    async with (
        Cluster(config) as cluster,
        httpx.AsyncClient(base_url=cluster.url, trust_env=False) as client,
    ):
        # Requests the page lists with their routes: straight to the holder, or replayed to it.
        for _ in range(4):
            answer = await client.get("/customers/100", headers={"accept": "application/json"})
            assert answer.status_code == 200
        holder = answer.json()["machine_id"]
        (standby,) = (m for m in cluster.machine_ids("100") if m != holder)
        # Not a tenant path: the proxy's port answers it, no machine sees it.
        assert (await client.post(f"/_dev/machines/{holder}/kill")).status_code == 403

        page = await browser.new_page()
        await page.goto(cluster.url + "/_dev/")
        tenant = page.locator('tr[data-tenant="100"]')
        await expect(tenant.locator('[data-field="holder"]')).to_have_text(holder)
        generation = int(await tenant.locator('[data-field="generation"]').inner_text())
        await expect(machine_field(page, holder, "lease")).to_have_text("holder")
        await expect(machine_field(page, standby, "lease")).to_have_text("standby")
        [status] = (m for m in cluster.status() if m.machine_id == standby)
        metrics = machine_field(page, standby, "metrics").locator("a")
        await expect(metrics).to_have_attribute(
            "href", f"http://127.0.0.1:{status.metrics_port}/metrics"
        )
        latest = page.locator("#requests tr").first
        await expect(latest).to_contain_text("GET /customers/100")
        await expect(latest.locator('[data-field="route"]')).to_contain_text(f"→ {holder}")

        running = page.locator(f'tr[data-machine="{standby}"] button')
        await expect(running).to_have_text(["stop", "kill"])
        await page.locator(f'tr[data-machine="{holder}"] button[data-action="kill"]').click()
        await expect(machine_field(page, holder, "state")).to_have_text("failed")
        await expect(page.locator(f'tr[data-machine="{holder}"] button')).to_have_text(["start"])
        await expect(tenant.locator('[data-field="holder"]')).to_have_text(
            standby, timeout=TAKEOVER
        )
        await expect(tenant.locator('[data-field="generation"]')).to_have_text(str(generation + 1))
        await expect(machine_field(page, standby, "lease")).to_have_text("holder")
        await expect(machine_field(page, standby, "generation")).to_have_text(str(generation + 1))
        answer = await client.get("/customers/100", headers={"accept": "application/json"})
        assert answer.json()["machine_id"] == standby

        await page.locator(f'tr[data-machine="{holder}"] button[data-action="start"]').click()
        await expect(machine_field(page, holder, "state")).to_have_text("started")
        await expect(machine_field(page, holder, "lease")).to_have_text("standby")
        await expect(page.locator("#requests tr").first).to_contain_text(f"→ {standby}")
        if screenshot := os.environ.get("DASHBOARD_SCREENSHOT"):
            await page.screenshot(path=screenshot, full_page=True)


async def test_a_killed_holder_is_shown_unavailable_not_woken_and_offers_only_start(
    tmp_path: Path,
) -> None:
    config = ClusterConfig(
        tenants=("100",),
        machines_per_tenant=2,
        port=0,
        state_dir=tmp_path / "state",
        kill_timeout=10,
        # No takeover during the test, and a standby that does not hold the request long.
        env={"TENANTDB_LEASE_TTL": "60", "TENANTDB_HANDOFF_WAIT": "0.1"},
    )
    act = {"x-tenantdb-dev": "1"}
    async with (
        Cluster(config) as cluster,
        httpx.AsyncClient(base_url=cluster.url, trust_env=False) as client,
    ):
        answer = await client.get("/customers/100", headers={"accept": "application/json"})
        holder = answer.json()["machine_id"]
        (standby,) = (m for m in cluster.machine_ids("100") if m != holder)
        refused = await client.post(f"/_dev/machines/{standby}/start", headers=act)
        assert refused.status_code == 409
        assert f"machine {standby} is started: it can only stop, kill" in refused.json()["error"]
        assert (await client.post(f"/_dev/machines/{holder}/kill", headers=act)).is_success

        failed = await client.get("/customers/100", headers={"fly-force-instance-id": standby})
        assert failed.status_code == 503
        state = (await client.get("/_dev/state")).json()
        actions = {m["id"]: m["actions"] for m in state["machines"]}
        assert actions == {holder: ["start"], standby: ["stop", "kill"]}
        latest = state["requests"][0]
        assert latest["status"] == 503
        assert latest["answered_after"] >= 0.1  # the standby held it (TENANTDB_HANDOFF_WAIT)
        [first, replayed, *_] = latest["steps"]
        assert (first["machine"], first["kind"], first["woken"]) == (standby, "direct", False)
        assert (replayed["machine"], replayed["kind"]) == (holder, "replayed")
        assert replayed["woken"] is False
        assert f"machine {holder} (tenant 100) has failed" in replayed["failed"]
