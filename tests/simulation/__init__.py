"""A deterministic simulation of one tenant's machines over a faulty bucket (see
docs/guarantees.md and docs/development.md).

``loop``: the virtual-clock event loop with no threads; ``bucket``: the simulated bucket;
``schedule``: steps from a seed; ``harness``: real TenantDB machines driven by a schedule;
``invariants``: what must hold after every step; ``mutations``: past fixes, reverted;
``shrink``: the fewest failing steps; ``tmpfs``: a real full disk. Run
``python -m tests.simulation --seeds N`` or ``--seed S``.
"""
