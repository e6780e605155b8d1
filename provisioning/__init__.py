"""Provisioning: the fleet in the registry, brokers updated at runtime (issue 9)."""
