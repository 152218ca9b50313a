"""Shared test set-up.

Tests that need root, /dev/net/tun and network namespaces use the `netns_ok` fixture. They skip
cleanly elsewhere; with PYTUN_REQUIRE_NETNS=1 (CI sets it) such a skip becomes a failure.
"""

import json
import os
import pathlib
import shutil

import pytest

VECTORS = pathlib.Path(__file__).parent / "vectors"


def load_vector(name: str):
    return json.loads((VECTORS / name).read_text())


def _netns_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    for tool in ("ip",):
        if shutil.which(tool) is None:
            return f"needs the {tool} command"
    return None


@pytest.fixture(scope="session")
def netns_ok():
    why = _netns_missing()
    if why:
        if os.environ.get("PYTUN_REQUIRE_NETNS") == "1":
            pytest.fail(f"PYTUN_REQUIRE_NETNS=1 but this test {why}")
        pytest.skip(why)
    return True


def require_tools(*tools: str) -> None:
    """Skip (or fail under PYTUN_REQUIRE_NETNS=1) when a system tool a test drives is absent."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        msg = "needs " + ", ".join(missing)
        if os.environ.get("PYTUN_REQUIRE_NETNS") == "1":
            pytest.fail(f"PYTUN_REQUIRE_NETNS=1 but this test {msg}")
        pytest.skip(msg)
