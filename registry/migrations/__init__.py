"""Versioned SQL migrations of the registry (``NNNN_<name>.sql``), applied by :mod:`registry.migrate`."""
