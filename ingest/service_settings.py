"""What the settings of the registry's HTTP services (the API, the provisioning service) share:
read from ``<prefix><FIELD>`` variables on top of a settings file (:func:`ingest.settings.settings_from_env`:
every problem at once), written back as the variables a Deployment sets, and the registry DSN,
a secret that comes from its own variable only. Both images copy ``ingest/``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import ClassVar, Self

from pydantic import BaseModel, ConfigDict, SecretStr

from ingest.settings import SettingsError, settings_env, settings_from_env


class ServiceSettings(BaseModel):
    """A subclass names its variables' ``ENV_PREFIX``, its ``SETTINGS_FILE_VAR``, the ``SECRETS``
    never written back, and ``WHAT`` errors call the service."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    ENV_PREFIX: ClassVar[str]
    SETTINGS_FILE_VAR: ClassVar[str]
    SECRETS: ClassVar[frozenset[str]]
    WHAT: ClassVar[str]

    registry_dsn: SecretStr | None = None

    def dsn(self) -> str:
        """The registry DSN; :class:`SettingsError` naming the variable when it is missing."""
        if self.registry_dsn is None or not self.registry_dsn.get_secret_value():
            raise SettingsError([f"{self.ENV_PREFIX}REGISTRY_DSN: is required"], self.WHAT)
        return self.registry_dsn.get_secret_value()

    def to_env(self) -> dict[str, str]:
        """The non-secret settings as ``<prefix>*`` variables (what a Deployment sets)."""
        return settings_env(self, prefix=self.ENV_PREFIX, json_fields=(), secrets=self.SECRETS)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Self:
        return settings_from_env(
            cls,
            os.environ if environ is None else environ,
            prefix=cls.ENV_PREFIX,
            json_fields=(),
            file_var=cls.SETTINGS_FILE_VAR,
            what=cls.WHAT,
        )
