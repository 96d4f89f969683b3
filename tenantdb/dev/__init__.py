"""The local Fly emulation behind `tenantdb dev`: a DNS responder, a proxy that replays as
Fly's does, machines as processes, the cluster runner and its dashboard.

Modules here sit on top: they may import every package below (routing, protocol, storage, the
foundation modules); only the CLI and tests import them.
"""
