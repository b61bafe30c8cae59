"""Exceptions that carry a one-line reason for users."""

from __future__ import annotations


class EnvironmentProviderError(Exception):
    """Base class: the message is one line that names what failed, on which value, and what to do."""


class ConfigurationError(EnvironmentProviderError):
    """A testrun or provider configuration is missing, unknown or inconsistent."""


class TestrunCheckedOutError(ConfigurationError):
    """The testrun has checked-out environments, so it cannot be configured again until it is released."""

    __test__ = False


class ProviderError(EnvironmentProviderError):
    """A provider failed in one stage (`list`, `checkout`, `checkin`, `prepare`, `start`, `status`, `stop`)."""

    def __init__(self, provider_id: str, stage: str, message: str) -> None:
        self.provider_id = provider_id
        self.stage = stage
        super().__init__(f"provider {provider_id!r} failed in stage {stage!r}: {message}")


class NoItemsError(ProviderError):
    """The provider lists no possible items, or fewer than the minimum: waiting cannot help."""


class CheckoutTimeoutError(ProviderError):
    """Not enough items became available before the deadline."""


class CheckinError(ProviderError):
    """An item could not be checked in."""


class TotalTimeoutError(EnvironmentProviderError):
    """The testrun's total timeout ran out."""
