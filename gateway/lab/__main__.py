"""``python -m gateway.lab simulate|replay ...`` (the same as ``vtc-gateway lab ...``)."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
