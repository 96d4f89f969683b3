"""The example app, imported ``LATE_SECONDS`` late on machines in the region ``LATE_REGION``
names (``FLY_REGION``): started together with the others, such a machine comes last."""

from __future__ import annotations

import os
import time

from example_app import app

__all__ = ["app"]

if os.environ.get("FLY_REGION") == os.environ.get("LATE_REGION"):
    time.sleep(float(os.environ.get("LATE_SECONDS", "1")))
