# The counter demo (example_app) with tenantdb, for Fly.io: see "Deploy to Fly.io" in README.md.
# For your own app, `tenantdb init --app module:app` writes one (README, "Deploy your own app").
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# The app runs as this user; /data is its scratch space for SQLite files (the bucket holds
# the data, so no volume is needed).
RUN useradd --system --uid 10001 --no-create-home app \
    && mkdir /data \
    && chown app:app /data

WORKDIR /app

# Dependencies in a layer of their own, read from pyproject.toml: it is rebuilt only when
# they change, not on every change to the source.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
    && pip install --requirement requirements.txt \
    && rm requirements.txt

COPY tenantdb ./tenantdb
COPY example_app ./example_app

USER app

# Every machine gets these, including machines created with the Machines API or
# `fly machine run`, which do not read [env] in fly.toml. TENANTDB_KILL_TIMEOUT matches
# kill_timeout in fly.toml. Bodies too large for fly-replay go to their tenant's machine
# through the app's Flycast address (README.md, "Deploy to Fly.io"), which reaches machines listening on
# 0.0.0.0 and starts stopped ones.
ENV HOST=0.0.0.0 \
    PORT=8080 \
    TENANTDB_DATA_DIR=/data \
    TENANTDB_KILL_TIMEOUT=60 \
    TENANTDB_PROXY_URL=http://{app}.flycast

EXPOSE 8080

# Exec form: python is the process Fly signals (SIGINT, see fly.toml), so uvicorn shuts
# down gracefully and tenantdb publishes the final snapshot.
CMD ["python", "-m", "example_app"]
