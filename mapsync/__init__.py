"""mapsync: versioned, signed lookup maps for a mail cluster.

A publisher renders Postfix/Exim/Dovecot maps from the central SQL database into signed
releases, one channel per node role; an agent on every node pulls its channel with rsync,
verifies it and swaps the whole set in atomically.
"""

from __future__ import annotations

__version__ = "0.1.0"
GENERATOR = f"mapsync {__version__}"
