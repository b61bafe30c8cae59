"""JSONTas provider stages evaluated in this process against the test lab."""

from __future__ import annotations

import time

import pytest

from environment_provider.errors import CheckoutTimeoutError, ProviderError
from environment_provider.keys import IUT
from environment_provider.providers.base import CheckoutRequest, ProviderContext
from environment_provider.providers.jsontas import JsontasProvider

from lab import LAB_PROVIDER

TESTRUN_ID = "5f2a4c1e-0b7d-4e3a-9c61-2d8f0a7b3e95"


def lab_provider(lab, settings, definition=None):
    context = ProviderContext(
        testrun_id=TESTRUN_ID,
        settings=settings,
        dataset={"lab_url": lab.url},
        identity="pkg:docker/acme/edge-gateway@5.2.0",
    )
    return JsontasProvider(IUT, definition or LAB_PROVIDER["iut"], context)


def test_bare_request_in_list_is_explained(lab, settings):
    definition = {
        "id": "bare-request",
        "list": {
            "possible": {"$request": {"url": {"$join": {"strings": ["$lab_url", "/devices"]}}, "method": "GET"}},
            "available": "$this.possible",
        },
    }

    with pytest.raises(ProviderError) as raised:
        lab_provider(lab, settings, definition).list(2, {})

    assert "'possible' evaluated to a $request response, not a list" in str(raised.value)
    assert '"get": "json"' in str(raised.value)


def test_wait_lasts_until_deadline(lab, settings):
    for device in lab.state.devices.values():
        device.reserved = True
    provider = lab_provider(lab, settings)
    request = CheckoutRequest(2, 2, time.monotonic() + 1.0, deadline_source="the 'iut' timeout of 1 s")

    started = time.monotonic()
    with pytest.raises(CheckoutTimeoutError, match="when the 'iut' timeout of 1 s ran out"):
        provider.checkout(request)

    assert 1.0 <= time.monotonic() - started < 2.0
    assert lab.state.reservations == 0
