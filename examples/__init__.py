"""Example downstream services for ProxyMQ (each a package of its own, importing nothing
of ProxyMQ: dependencies point one way)."""
