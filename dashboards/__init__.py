"""Per-tenant Grafana dashboards and alert rules, and the platform's Prometheus alert rules, built
from the tenant model with grafana-foundation-sdk (see ``dashboards/README.md``)."""
