"""``mapsync mirror`` stands on the release contract and the transport alone: loading it
loads neither the publisher nor the agent (docs/scaling.md, README's layout)."""

from __future__ import annotations

import subprocess
import sys


def test_the_mirror_imports_neither_publisher_nor_agent() -> None:
    code = (
        "import sys, mapsync.mirror, mapsync.release.verify\n"
        "print('\\n'.join(sorted(m for m in sys.modules if m.startswith('mapsync.'))))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "mapsync.mirror" in loaded and "mapsync.transport.rsync" in loaded
    wrong = [
        m for m in loaded if m.startswith(("mapsync.publish", "mapsync.agent", "mapsync.maps"))
    ]
    assert wrong == []
