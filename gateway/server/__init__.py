"""The aiohttp server, split along the request lifecycle.

* :mod:`.state`: the long-lived state every request shares, built from the config;
* :mod:`.app`: the application factory, start-up/shutdown, error rendering;
* :mod:`.handlers`: routes, and a request's way from arrival to the dispatcher's grant;
* :mod:`.proxy`: forward, relay while charging, reconcile and release.
"""

from .app import create_admin_app, create_app
from .state import STATE, GatewayState, build_state

__all__ = ["STATE", "GatewayState", "build_state", "create_admin_app", "create_app"]
