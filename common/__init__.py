"""Code both sides of the wire use: the gateway and the simulated backend (token counting).

It imports neither :mod:`gateway` nor :mod:`backends`, so neither depends on the other.
"""
