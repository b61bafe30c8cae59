"""Provider types: the built-in ones and those installed packages register as entry points."""

from __future__ import annotations

import functools
import logging
from importlib.metadata import entry_points
from typing import Any

from ..errors import ConfigurationError, EnvironmentProviderError, ProviderError
from ..keys import Kind
from .base import Provider, ProviderContext

LOGGER = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "environment_provider.providers"
DEFAULT_TYPE = "jsontas"


@functools.cache
def _plugins() -> dict[str, Any]:
    """Return the group's installed entry points by name. The result is cached, so each process reads them once."""
    return {entry.name: entry for entry in entry_points(group=ENTRY_POINT_GROUP)}


def known_types() -> list[str]:
    """Return the provider types that can be used: built-in types first, then installed plug-ins."""
    return ["jsontas", "external", *sorted(set(_plugins()) - {"jsontas", "external"})]


def provider_class(type_name: str) -> type[Provider]:
    """Return the class for a provider type; raise ConfigurationError listing the known types."""
    if type_name == "jsontas":
        from .jsontas import JsontasProvider

        return JsontasProvider
    if type_name == "external":
        from .external import ExternalProvider

        return ExternalProvider
    entry = _plugins().get(type_name)
    if entry is None:
        raise ConfigurationError(
            f"unknown provider type {type_name!r}: known types are {', '.join(known_types())}; "
            f"install the package that registers it in the entry point group {ENTRY_POINT_GROUP!r}"
        )
    try:
        cls = entry.load()
    except Exception as error:  # noqa: BLE001 - importing a plug-in module may raise anything
        LOGGER.exception("provider type %r could not be loaded from %r", type_name, entry.value)
        raise ConfigurationError(
            f"provider type {type_name!r} could not be loaded from {entry.value!r}: {type(error).__name__}: {error}"
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, Provider)):
        raise ConfigurationError(
            f"provider type {type_name!r} ({entry.value}) is not a subclass of environment_provider.providers.Provider"
        )
    return cls


def create_provider(kind: Kind, definition: dict[str, Any], context: ProviderContext) -> Provider:
    """Instantiate the provider class a definition's `type` selects.

    Raises ConfigurationError for a type that cannot be loaded, and
    ProviderError (stage `init`) when the class's constructor raises.
    """
    cls = provider_class(definition.get("type", DEFAULT_TYPE))
    try:
        return cls(kind, definition, context)
    except EnvironmentProviderError:
        raise
    except Exception as error:  # noqa: BLE001 - a plug-in constructor may raise anything
        provider_id = str(definition.get("id", "?"))
        LOGGER.exception("testrun %s: provider %r raised while being created", context.testrun_id, provider_id)
        raise ProviderError(provider_id, "init", f"{type(error).__name__}: {error}") from None
