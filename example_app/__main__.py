"""``python -m example_app``: serve the counter demo on $PORT (default 8080)."""

from __future__ import annotations

import logging
import os

import uvicorn


def main() -> None:
    """Serve the demo with uvicorn; SIGINT and SIGTERM shut it down gracefully."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    uvicorn.run(
        "example_app:app",
        host=os.environ.get("HOST", "0.0.0.0"),
        port=int(os.environ.get("PORT", "8080")),
        lifespan="on",
        log_level="info",
    )


if __name__ == "__main__":
    main()
