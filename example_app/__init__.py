"""The counter demo: one counter per tenant, each tenant on its own machine."""

from example_app.app import MIGRATIONS, app, create_app

__all__ = ["MIGRATIONS", "app", "create_app"]
