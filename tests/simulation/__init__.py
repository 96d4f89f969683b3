"""A seeded simulation of one tenant's machines over a faulty bucket (see docs/guarantees.md).

``bucket``: the simulated bucket; ``schedule``: steps from a seed; ``harness``: real
TenantDB machines driven by a schedule; ``invariants``: what must hold after every step.
Run ``python -m tests.simulation --seeds N`` or ``--seed S``.
"""
