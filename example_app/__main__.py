"""``python -m example_app``: serve the counter demo on $HOST:$PORT, as ``tenantdb serve`` does."""

from __future__ import annotations

from tenantdb.cli.deploy import serve_app


def main() -> None:
    """Serve the demo as ``tenantdb serve`` would; SIGINT and SIGTERM stop it gracefully."""
    serve_app("example_app:app")


if __name__ == "__main__":
    main()
