"""Device registry: tenants, sites, machines, broker identities and their access, audit trail.

See ``registry/README.md``. The stack config is the source; :mod:`registry.store` writes it to
PostgreSQL, where EMQX reads it (:mod:`registry.queries`).
"""
