"""A seeded publisher with the ``postfix-mx`` node pulled once and a real Postfix started on
it, for the tests of what mail flow sees."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.daemons.postfix_instance import PostfixInstance
from tests.daemons.roles import Nodes, make_nodes

MX_ROLE = "postfix-mx"


@contextmanager
def running_mx(prefix: str, **seed: int) -> Iterator[tuple[Nodes, PostfixInstance]]:
    """The publisher seeded with ``seed`` (accounts, domains, aliases), the ``postfix-mx``
    node pulled once, and a Postfix started on it.

    One short directory for all of it: Postfix's socket paths must stay short, and its
    daemons (user postfix) must reach the maps, which pytest's 0700 tmp_path would forbid.
    """
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)
    try:
        nodes = make_nodes(root / "c", (MX_ROLE,), **seed)
        postfix = PostfixInstance(
            root / "pf", nodes.roles[MX_ROLE].snippet("main.cf", nodes.target(MX_ROLE))
        )
        try:
            postfix.start()
            yield nodes, postfix
        finally:
            postfix.stop()
    finally:
        shutil.rmtree(root)
