"""The local Fly emulation: a DNS responder, a proxy and a cluster runner for `tenantdb dev`."""
