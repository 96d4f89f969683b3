"""``python -m example_app``: serve the counter demo on $PORT (default 8080)."""

from __future__ import annotations

import os

import uvicorn

from tenantdb.logs import configure_logging


def main() -> None:
    """Serve the demo with uvicorn; SIGINT and SIGTERM shut it down gracefully."""
    configure_logging()
    uvicorn.run(
        "example_app:app",
        host=os.environ.get("HOST", "0.0.0.0"),
        port=int(os.environ.get("PORT", "8080")),
        lifespan="on",
        log_level="info",
        log_config=None,  # uvicorn's lines too go through tenantdb's format
    )


if __name__ == "__main__":
    main()
