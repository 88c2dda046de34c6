"""The HTTP request pipeline: everything here runs for each request (or builds what they share).

* :mod:`.state`: the long-lived state every request shares, built from the config;
* :mod:`.app`: the application factory, start-up/shutdown, error rendering;
* :mod:`.handlers`: routes, and a request's way from arrival to the dispatcher's grant, through
  :mod:`.auth` (key → tenant) and :mod:`.validate` (body → checked fields);
* :mod:`.proxy`: forward, relay while charging (:mod:`.relay`), reconcile and release.
"""

from .app import create_admin_app, create_app
from .state import STATE, GatewayState, build_state

__all__ = ["STATE", "GatewayState", "build_state", "create_admin_app", "create_app"]
