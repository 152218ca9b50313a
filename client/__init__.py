"""pytun-client: the laptop end."""
