"""`tenantdb doctor`: checks of the deployment the settings point at, one result per check.

Each check says what it found and, when it fails, what to do. Checks that cannot run say
why (skipped); checks that cannot be sure say what to look at (warning). Order: the bucket
(reachable, conditional writes enforced, consistent across the regions in use), then the
app's machines from the Machines API (stop timeout, autostop, metrics, restart policy,
metadata key, images), then the Flycast address (from inside Fly only).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

from tenantdb.config import Settings
from tenantdb.errors import (
    AccessDeniedError,
    BucketConfigurationError,
    ConditionalWritesIgnoredError,
    ObjectNotFoundError,
    ObjectTooLargeError,
    RoutingError,
    StorageError,
    TransientStorageError,
)
from tenantdb.routing.checks import Finding, check_flycast, check_machine_config
from tenantdb.routing.dns import MachineLocator
from tenantdb.routing.machines_api import Machine, MachinesClient
from tenantdb.storage import Bucket, open_bucket
from tenantdb.storage.probe import PROBE_DIRECTORY, check_conditional_writes

__all__ = ["CheckResult", "Status", "check_consistency", "run_checks"]

Status = Literal["pass", "fail", "warn", "skip"]
# The per-machine checks of tenantdb.routing.checks, in the order they are reported.
_MACHINE_CHECKS = ("stop timeout", "autostop", "metrics", "restart policy", "metadata key")
_NEEDS_API = "needs FLY_API_TOKEN (fly tokens create deploy) and FLY_APP_NAME"


@dataclass(frozen=True)
class CheckResult:
    """One line of the report: the check, its status, what was found, what to do."""

    check: str
    status: Status
    detail: str
    fix: str = ""

    def to_json(self) -> dict[str, str]:
        """The result as a JSON object."""
        return asdict(self)


async def run_checks(settings: Settings) -> list[CheckResult]:
    """Run every check against the deployment ``settings`` describe."""
    machines, machine_results = await _machine_checks(settings)
    results = await _bucket_checks(settings, machines)
    results += machine_results
    results.append(await _flycast_check(settings))
    return results


# -- the bucket ----------------------------------------------------------------------------


async def _bucket_checks(
    settings: Settings, machines: Sequence[Machine] | None
) -> list[CheckResult]:
    if not settings.bucket_name:
        # The embedded local bucket serves one computer: no deployment runs on it, and
        # opening it here would create its directory.
        missing = CheckResult(
            "bucket",
            "fail",
            "BUCKET_NAME is not set: machines would use the embedded local bucket "
            f"({settings.local_bucket_dir}), which serves one computer only",
            "on Fly, `fly storage create` sets BUCKET_NAME and the AWS_* secrets; elsewhere "
            "set BUCKET_NAME, AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
        )
        return _without_bucket(missing)
    bucket = open_bucket(settings)
    async with bucket:
        reachable = await _reachable(bucket, settings)
        if reachable.status != "pass":
            return _without_bucket(reachable)
        results = [
            reachable,
            await _conditional_writes(bucket, settings),
            check_consistency(settings, _tenant_regions(settings, machines)),
        ]
        if settings.encryption_keys is not None:
            # Imported here: the keys command builds on these checks' CheckResult.
            from tenantdb.cli.keys import encryption_check

            results.append(await encryption_check(bucket, settings))
        return results


def _without_bucket(failed: CheckResult) -> list[CheckResult]:
    why = "the bucket is not reachable"
    return [
        failed,
        CheckResult("conditional writes", "skip", why),
        CheckResult("consistency", "skip", why),
    ]


def _tenant_regions(
    settings: Settings, machines: Sequence[Machine] | None
) -> dict[str, set[str]] | None:
    if machines is None:
        return None
    regions: dict[str, set[str]] = {}
    for machine in machines:
        tenant = machine.tenant(settings.metadata_key)
        if tenant is not None and machine.region:
            regions.setdefault(tenant, set()).add(machine.region)
    return regions


async def _reachable(bucket: Bucket, settings: Settings) -> CheckResult:
    # The repr names the bucket, the endpoint and (for S3) the addressing style.
    try:
        # A GET, not a HEAD: a HEAD's 404 has no body to tell NoSuchBucket from NoSuchKey.
        await bucket.get(f"{settings.prefix}{PROBE_DIRECTORY}/reachable", max_size=1024)
    except (ObjectNotFoundError, ObjectTooLargeError):
        return CheckResult("bucket", "pass", f"{bucket!r} answers")
    except AccessDeniedError as exc:
        fix = (
            "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (on Fly, `fly storage create` "
            "sets them as secrets) and that the key may read and write the bucket"
        )
        return CheckResult("bucket", "fail", f"{bucket!r}: {exc}", fix)
    except BucketConfigurationError as exc:
        fix = (
            "check BUCKET_NAME and AWS_ENDPOINT_URL_S3; on plain S3 the bucket must exist "
            "already; Tigris buckets need virtual-hosted addressing "
            "(TENANTDB_S3_ADDRESSING=auto or virtual)"
        )
        return CheckResult("bucket", "fail", f"{bucket!r}: {exc}", fix)
    except StorageError as exc:
        transient = isinstance(exc, TransientStorageError)
        fix = "check the endpoint and the network" if transient else "see the error"
        return CheckResult("bucket", "fail", f"{bucket!r}: {exc}", fix)
    # Someone put an object there: harmless, and the bucket answered.
    return CheckResult("bucket", "pass", f"{bucket!r} answers")


async def _conditional_writes(bucket: Bucket, settings: Settings) -> CheckResult:
    try:
        await check_conditional_writes(bucket, settings.prefix)
    except ConditionalWritesIgnoredError as exc:
        fix = (
            "use a store that enforces If-Match and If-None-Match on PUT (Tigris, AWS S3, "
            "R2, MinIO): on this one two machines can hold one tenant's lease"
        )
        return CheckResult("conditional writes", "fail", str(exc), fix)
    except StorageError as exc:
        fix = "the key needs PutObject and DeleteObject under TENANTDB_PREFIX"
        return CheckResult("conditional writes", "fail", f"the probe failed: {exc}", fix)
    return CheckResult(
        "conditional writes",
        "pass",
        f"If-None-Match: * and If-Match enforced (scratch key under {settings.prefix!r} removed)",
    )


def check_consistency(
    settings: Settings, tenant_regions: Mapping[str, set[str]] | None
) -> CheckResult:
    """Whether the bucket is consistent enough for the regions each tenant's machines run in
    (``tenant_regions``: tenant -> regions; None: unknown)."""
    declared = settings.bucket_consistency
    if not settings.is_tigris:
        if settings.consistent_across_regions:
            return CheckResult(
                "consistency",
                "pass",
                "not a Tigris endpoint: taken as strongly consistent across regions "
                f"(TENANTDB_BUCKET_CONSISTENCY={declared})",
            )
        return CheckResult("consistency", "pass", "declared regional: leases stay in their region")
    if tenant_regions is None:
        return CheckResult(
            "consistency",
            "warn",
            f"a Tigris bucket; the regions the machines run in are unknown ({_NEEDS_API})",
            "if a tenant's machines run in more than one region, check in the Tigris dashboard "
            "that the bucket's location type is Single-region or Multi-region and set "
            "TENANTDB_BUCKET_CONSISTENCY=strong",
        )
    spread = {
        tenant: sorted(regions) for tenant, regions in tenant_regions.items() if len(regions) > 1
    }
    if settings.consistent_across_regions:
        return CheckResult(
            "consistency",
            "warn",
            "the bucket is declared strongly consistent (TENANTDB_BUCKET_CONSISTENCY=strong), "
            "which the S3 API cannot confirm",
            "check in the Tigris dashboard that the bucket's location type is Single-region "
            "or Multi-region (Global and Dual-region are strong only within a region)",
        )
    if not spread:
        return CheckResult(
            "consistency",
            "pass",
            "each tenant's machines are in one region: Tigris is strongly consistent within one",
        )
    where = "; ".join(f"{t} in {', '.join(r)}" for t, r in sorted(spread.items()))
    return CheckResult(
        "consistency",
        "fail",
        f"tenants with machines in several regions on a Tigris bucket not declared strongly "
        f"consistent ({where}): a lease last held in another region is refused",
        "use a Single-region or Multi-region bucket and set TENANTDB_BUCKET_CONSISTENCY=strong, "
        "or keep each tenant's machines in one region",
    )


# -- the machines --------------------------------------------------------------------------


async def _machine_checks(
    settings: Settings,
) -> tuple[list[Machine] | None, list[CheckResult]]:
    names = (*_MACHINE_CHECKS, "images")
    if not settings.app_name or settings.fly_api_token is None:
        return None, [CheckResult(name, "skip", _NEEDS_API) for name in names]
    try:
        async with MachinesClient(
            settings.app_name, settings.fly_api_token, settings.machines_api_url
        ) as client:
            machines = await client.list_machines()
    except RoutingError as exc:
        fix = "check FLY_APP_NAME, FLY_API_TOKEN and TENANTDB_MACHINES_API_URL"
        failed = CheckResult("machines api", "fail", str(exc), fix)
        return None, [failed, *(CheckResult(n, "skip", "the Machines API failed") for n in names)]
    live = [m for m in machines if m.state not in ("destroying", "destroyed")]
    if not live:
        why = f"app {settings.app_name} has no machines"
        return live, [CheckResult(name, "skip", why) for name in names]
    findings: dict[str, list[Finding]] = {name: [] for name in _MACHINE_CHECKS}
    for machine in live:
        for finding in check_machine_config(machine, settings):
            findings[finding.check].append(finding)
    results = [_summary(name, findings[name], len(live)) for name in _MACHINE_CHECKS]
    results.append(_images(live))
    return live, results


def _summary(check: str, findings: list[Finding], count: int) -> CheckResult:
    failed = [f for f in findings if not f.ok]
    if not failed:
        return CheckResult(check, "pass", f"all {count} machine(s): {findings[0].detail}")
    detail = "; ".join(f.detail for f in failed)
    return CheckResult(check, "fail", detail, failed[0].fix)


def _images(machines: Sequence[Machine]) -> CheckResult:
    images = Counter(m.image or "(none)" for m in machines)
    if len(images) == 1:
        (image,) = images
        return CheckResult("images", "pass", f"all {len(machines)} machine(s) run {image}")
    common = images.most_common(1)[0][0]
    odd = ", ".join(f"{m.id} runs {m.image}" for m in machines if (m.image or "(none)") != common)
    return CheckResult(
        "images",
        "fail",
        f"{len(images)} images: most run {common}; {odd}",
        f"update them (fly machine update <id> --image {common}), or redeploy every machine",
    )


# -- Flycast -------------------------------------------------------------------------------


async def _flycast_check(settings: Settings) -> CheckResult:
    if not settings.app_name:
        return CheckResult("flycast", "skip", "needs FLY_APP_NAME")
    if ".flycast" not in settings.proxy_url:
        return CheckResult("flycast", "skip", f"not used: TENANTDB_PROXY_URL={settings.proxy_url}")
    if settings.dns_server is None and settings.fly_region == "local":
        return CheckResult(
            "flycast",
            "skip",
            "only resolvable from inside Fly: run `fly ssh console -C 'tenantdb doctor'`",
        )
    try:
        finding = await check_flycast(settings, MachineLocator.from_settings(settings))
    except RoutingError as exc:
        return CheckResult("flycast", "fail", str(exc), "check Fly's internal DNS")
    return CheckResult("flycast", "pass" if finding.ok else "fail", finding.detail, finding.fix)
