"""`ferry lab`: a whole fleet on one machine (namespaces as hosts, a fabric, agents, a controller)."""
