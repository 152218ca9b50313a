"""pytun-server and pytun-admin: the hub."""
