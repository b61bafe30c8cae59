"""Provider classes: the plug-in base class, JSONTas and external providers, and the type loader."""

from .base import CheckoutRequest, Provider, ProviderContext
from .loader import known_types, provider_class

__all__ = ["CheckoutRequest", "Provider", "ProviderContext", "known_types", "provider_class"]
