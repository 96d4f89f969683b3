"""Files `tenantdb init` writes into a project: Dockerfile, fly.toml, .dockerignore."""
