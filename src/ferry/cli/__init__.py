"""The `ferry` command line: a client of the controller API (plus the servers and the lab)."""
