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


def test_bare_request_in_list_lists_response_body(lab, settings):
    definition = {
        "id": "bare-request",
        "list": {
            "possible": {"$request": {"url": {"$join": {"strings": ["$lab_url", "/devices"]}}, "method": "GET"}},
            "available": {"$filter": {"items": "$this.possible", "filters": [{"key": "reserved", "operator": "$eq", "value": False}]}},
        },
    }
    lab.state.devices["SN0000"].reserved = True

    possible, available = lab_provider(lab, settings, definition).list(2, {})

    assert [device["serial"] for device in possible] == sorted(lab.state.devices)
    assert "SN0000" not in [device["serial"] for device in available]
    assert len(available) == len(possible) - 1


def test_failed_request_in_list_names_status(lab, settings):
    definition = {
        "id": "missing-path",
        "list": {"possible": {"$request": {"url": {"$join": {"strings": ["$lab_url", "/nowhere"]}}, "method": "GET"}}, "available": "$this.possible"},
    }

    with pytest.raises(ProviderError, match="'possible' got HTTP 404"):
        lab_provider(lab, settings, definition).list(2, {})


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
