"""``python -m mapsync``: the ``mapsync`` command."""

from __future__ import annotations

from mapsync.cli.main import main

raise SystemExit(main())
