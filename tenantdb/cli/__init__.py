"""The ``tenantdb`` command: one module per verb group, ``main`` builds the parser.

The CLI sits on top: it may import every other package; nothing in tenantdb imports it.
"""
