"""Pulumi dynamic providers for what has no Pulumi provider: InfluxDB 2.x tenancy (``influxdb``) and
the device registry rows (``registry``).

A dynamic provider object is pickled with dill into the resource's state when the resource is
declared (under the mock engine too) and unpickled in the engine's provider process: providers here
hold no client, connection or socket; each operation opens its own from the resource's inputs.
The engine hands ``diff`` the inputs with not-yet-known values as :data:`pulumi.runtime.rpc.UNKNOWN`
and numbers as floats (the wire has only doubles); :func:`plan_diff` handles both for every provider.
Importing this package also mends a Pulumi SDK leak that breaks programs with many dynamic resources.
"""

from __future__ import annotations

import functools
import pickle
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pulumi.dynamic.dynamic as pulumi_dynamic
from pulumi.dynamic import DiffResult


def plan_diff(
    olds: Mapping[str, Any],
    news: Mapping[str, Any],
    *,
    replace: Iterable[str],
    update: Iterable[str],
    delete_before_replace: bool = False,
) -> DiffResult:
    """Compare the inputs a provider cares about: a change of a ``replace`` key forces a new resource
    (the API cannot change it in place), a change of an ``update`` key is applied by ``update``.
    An unknown new value counts as a change (the engine resolves it before ``update`` runs)."""
    replace_keys = list(replace)
    changed = [key for key in [*replace_keys, *update] if _normal(olds.get(key)) != _normal(news.get(key))]
    replaces = [key for key in changed if key in replace_keys]
    return DiffResult(
        changes=bool(changed),
        replaces=replaces,
        delete_before_replace=delete_before_replace if replaces else None,
    )


def _normal(value: Any) -> Any:
    """Integral floats as ints, recursively, so that ``3600.0`` from the wire equals ``3600``."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, Mapping):
        return {key: _normal(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_normal(item) for item in value]
    return value


def _flat_pickler_patch(serialize: Callable[[Any], str]) -> Callable[[Any], str]:
    """The SDK's ``serialize_provider`` (pulumi 3.272) wraps ``pickle._Pickler._batch_setitems`` once
    per dynamic resource and never unwraps it: past ~1,000 dynamic resources in one program (about
    160 tenants) pickling the next provider raises ``RecursionError``. Restoring the pickler after
    each call keeps the wrapper one level deep; the SDK's sorted (deterministic) pickling is unchanged."""

    @functools.wraps(serialize)
    def serialize_flat(provider: Any) -> str:
        saved = pickle._Pickler._batch_setitems, pickle._Pickler.save_dict  # type: ignore[attr-defined]
        try:
            return serialize(provider)
        finally:
            pickle._Pickler._batch_setitems, pickle._Pickler.save_dict = saved  # type: ignore[attr-defined]

    return serialize_flat


if not hasattr(pulumi_dynamic.serialize_provider, "__wrapped__"):
    pulumi_dynamic.serialize_provider = _flat_pickler_patch(pulumi_dynamic.serialize_provider)
