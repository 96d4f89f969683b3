"""The request path: the ASGI middleware, the connection lent to a request, the output gate,
a replica's reads, tail hints between a holder and its standbys.

Modules here may import everything below them (machine, routing, connections, storage); only
the CLI, dev and the package's public API import them.
"""
