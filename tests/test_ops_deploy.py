"""The hub unit speaks systemd's notify protocol and has a watchdog the hub keeps alive."""

from __future__ import annotations

from .test_deploy import SERVER_UNIT, parse_unit, value


def test_hub_unit_is_type_notify_with_a_watchdog():
    unit = parse_unit(SERVER_UNIT)
    assert value(unit, "Service", "Type") == "notify"
    assert value(unit, "Service", "NotifyAccess") == "main"
    watchdog = value(unit, "Service", "WatchdogSec")
    assert watchdog.endswith("s") and 10 <= int(watchdog[:-1]) <= 120
    # systemd restarts a hub that missed its watchdog only with a Restart= that covers it.
    assert value(unit, "Service", "Restart") in ("on-failure", "on-watchdog", "always")
    # The notify socket is a unix socket: the sandbox must allow AF_UNIX.
    assert "AF_UNIX" in value(unit, "Service", "RestrictAddressFamilies").split()
