"""Shared test set-up.

Tests that need root, /dev/net/tun and network namespaces use the `netns_ok` fixture and carry
the `netns` mark (checked at collection). They skip cleanly elsewhere; with
PYTUN_REQUIRE_NETNS=1 (CI sets it) such a skip becomes a failure, and so does every other skip
for a missing tool, root or installed product (`skip_or_fail`).
"""

import json
import os
import pathlib
import shutil

import pytest

VECTORS = pathlib.Path(__file__).parent / "vectors"


def load_vector(name: str):
    return json.loads((VECTORS / name).read_text())


# ---------------------------------------------------------------------------------- skips


def skip_or_fail(why: str) -> None:
    """Skip this test, or under PYTUN_REQUIRE_NETNS=1 (CI) fail it: nothing may skip there."""
    if os.environ.get("PYTUN_REQUIRE_NETNS") == "1":
        pytest.fail(f"PYTUN_REQUIRE_NETNS=1 but this test {why}")
    pytest.skip(why)


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
        skip_or_fail(why)
    return True


def require_tools(*tools: str) -> None:
    """Skip (or fail under PYTUN_REQUIRE_NETNS=1) when a system tool a test drives is absent."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        skip_or_fail("needs " + ", ".join(missing))


def require_root(why: str) -> None:
    if os.geteuid() != 0:
        skip_or_fail(f"needs root: it {why}")


def require_installed(why: str) -> None:
    """The product as scripts/install-deps installs it (/opt/pytun, /usr/local/bin) is absent."""
    skip_or_fail(f"needs the installed product: {why}")


def pytest_collection_modifyitems(config, items):
    unmarked = [item.nodeid for item in items
                if "netns_ok" in getattr(item, "fixturenames", ())
                and item.get_closest_marker("netns") is None]
    if unmarked:
        raise pytest.UsageError("tests that build namespaces (netns_ok) must carry "
                                "@pytest.mark.netns:\n  " + "\n  ".join(unmarked))
