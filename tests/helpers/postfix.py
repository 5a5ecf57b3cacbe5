"""A seeded publisher with the ``postfix-mx`` node pulled once and a real Postfix started on
it, for the tests of what mail flow sees."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mapsync import config
from tests.daemons.postfix_instance import PostfixInstance
from tests.daemons.roles import AGENTS, Nodes, make_nodes

MX_ROLE = "postfix-mx"


@contextmanager
def running_mx(
    prefix: str, roles: tuple[str, ...] = (MX_ROLE,), **seed: int
) -> Iterator[tuple[Nodes, PostfixInstance]]:
    """The publisher seeded with ``seed`` (accounts, domains, aliases), the ``postfix-mx``
    node (and the other ``roles``) pulled once, and a Postfix started on it with the role's
    main.cf and master.cf lines.

    One short directory for all of it: Postfix's socket paths must stay short, and its
    daemons (user postfix) must reach the maps, which pytest's 0700 tmp_path would forbid.
    """
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)
    try:
        nodes = make_nodes(root / "c", roles, **seed)
        mx = nodes.roles[MX_ROLE]
        postfix = PostfixInstance(
            root / "pf", mx.snippet("main.cf", nodes.target(MX_ROLE)), mx.file("master.cf")
        )
        try:
            postfix.start()
            yield nodes, postfix
        finally:
            postfix.stop()
    finally:
        shutil.rmtree(root)


def use_reload_hook(nodes: Nodes, postfix: PostfixInstance) -> tuple[str, ...]:
    """Give the MX node's agent channel the reload hook of ``agents/postfix-mx/agent.toml``,
    with ``-c`` naming ``postfix``'s instance; return the hook."""
    (prod,) = config.load(AGENTS / MX_ROLE / "agent.toml").need_agent().channels.values()
    assert prod.reload == ("postfix", "reload")
    hook = (prod.reload[0], "-c", str(postfix.conf), *prod.reload[1:])
    channel = nodes.roles[MX_ROLE].channel
    text = nodes.cluster.config_path.read_text()
    section = f"[agent.channels.{channel}]\n"
    assert text.count(section) == 1
    nodes.cluster.config_path.write_text(
        text.replace(section, f"{section}reload = {json.dumps(list(hook))}\n")
    )
    assert nodes.cluster.config().need_agent().channels[channel].reload == hook
    return hook
