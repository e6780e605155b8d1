"""PostgreSQL first-start script: the least-privilege roles the other components log in as.

The official image runs ``/docker-entrypoint-initdb.d/*.sh`` once, when the data directory is
initialised. Both roles are created in every phase, so that moving Grafana to HA or the broker to
EMQX later needs no manual step. Passwords come from the environment (Kubernetes Secret) through
psql variables, never from the script text.
"""

from __future__ import annotations

EMQX_ROLE = "emqx"
"""EMQX's authenticator/authorizer: may read the registry, nothing else."""
GRAFANA_ROLE = "grafana"
"""Grafana's HA database owner."""
GRAFANA_DATABASE = "grafana"
PASSWORD_ENV = {EMQX_ROLE: "EMQX_DB_PASSWORD", GRAFANA_ROLE: "GRAFANA_DB_PASSWORD"}


def render_init_script(database: str, owner: str) -> str:
    emqx_var, grafana_var = PASSWORD_ENV[EMQX_ROLE], PASSWORD_ENV[GRAFANA_ROLE]
    return f"""#!/bin/sh
# Rendered by Ironlink: runs once, when the data directory is initialised.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \\
  -v emqx_password="${emqx_var}" -v grafana_password="${grafana_var}" <<'EOSQL'
CREATE ROLE {EMQX_ROLE} LOGIN PASSWORD :'emqx_password';
GRANT CONNECT ON DATABASE "{database}" TO {EMQX_ROLE};
GRANT USAGE ON SCHEMA public TO {EMQX_ROLE};
ALTER DEFAULT PRIVILEGES FOR ROLE "{owner}" IN SCHEMA public GRANT SELECT ON TABLES TO {EMQX_ROLE};
CREATE ROLE {GRAFANA_ROLE} LOGIN PASSWORD :'grafana_password';
CREATE DATABASE {GRAFANA_DATABASE} OWNER {GRAFANA_ROLE};
EOSQL
"""
