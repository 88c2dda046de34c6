"""Tools around the gateway, never on its request path: benchmarks and the soak run.

``vtc-gateway bench proxy``, ``vtc-gateway bench scheduler`` and ``vtc-gateway soak`` come from
here; the runtime package :mod:`gateway` imports this package only to register those commands.
"""
