"""Hostile input to pytun-admin and the registry: refused with one line, registry unchanged."""

from __future__ import annotations

import pytest

from pytun.common import config
from pytun.server import control, state
from pytun.server.registry import RegistryError, check_name


@pytest.mark.parametrize("name", ["alice\n", "alice\r\n", "\nalice", "ali\nce", "alice\x00"])
def test_a_name_with_a_newline_is_refused(name):
    with pytest.raises(RegistryError, match="bad peer name"):
        check_name(name)


def test_other_whole_string_patterns():
    with pytest.raises(state.StateError, match="bad interface name"):
        state.HubSettings(subnet="10.77.0.0/24", endpoint="vpn.example.com", interface="pytun0\n")
    with pytest.raises(control.ControlError, match="keys are"):
        control.format_request([("get\n", "1")])  # would have sent a bare "get" line
    assert config._HOSTNAME.fullmatch("vpn.example.com") and not config._HOSTNAME.fullmatch("vpn.example.com\n")
