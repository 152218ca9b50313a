"""pytun tests; a package so test modules can `from tests.netns import ...`."""
