"""Maps rendered ahead by a forked child (mapsync.publish.render) are the maps the publisher
renders itself: the same bytes, the same manifest entries, the same refusals."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from sqlalchemy import create_engine, insert

from mapsync.errors import InvalidData
from mapsync.formats import text
from mapsync.publish import render
from mapsync.publish.publisher import Publisher, PublishResult
from mapsync.sources import open_source
from mapsync.sources import schema as t
from tests.conftest import Cluster, make_cluster

MAPS = ("domains", "recipients", "virtual", "transport")


def publish(cluster: Cluster, **kw: bool) -> PublishResult:
    pub = cluster.config().need_publisher()
    return Publisher(pub, lambda: open_source(pub.database, pub.schema)).run(**kw)


def release(cluster: Cluster) -> tuple[dict[str, bytes], dict[str, object]]:
    serial = json.loads((cluster.repo / "mx" / "LATEST").read_text())["serial"]
    rel = cluster.repo / "mx" / "releases" / str(serial)
    manifest = json.loads((rel / "MANIFEST.json").read_text())
    return {n: (rel / n).read_bytes() for n in MAPS}, manifest["maps"]


@pytest.fixture
def twins(tmp_path: Path) -> tuple[Cluster, Cluster]:
    """Two publishers of copies of one seeded database."""
    a = make_cluster(tmp_path / "a", f"sqlite:///{tmp_path / 'a.db'}", accounts=300, aliases=150)
    shutil.copyfile(tmp_path / "a.db", tmp_path / "b.db")
    b = Cluster(tmp_path / "b", f"sqlite:///{tmp_path / 'b.db'}")
    (tmp_path / "b" / "keys").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "keys", tmp_path / "b" / "keys", dirs_exist_ok=True)
    b.write_config()
    return a, b


def taken(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The maps the publisher took from the child (forced to fork at any size)."""
    monkeypatch.setattr(render, "MIN_ROWS", 0)
    got: list[str] = []
    take = render.Ahead.take

    def spy(self: render.Ahead, ch, name, *args):  # type: ignore[no-untyped-def]
        result = take(self, ch, name, *args)
        if result is not None:
            got.append(name)
        return result

    monkeypatch.setattr(render.Ahead, "take", spy)
    return got


def test_maps_rendered_ahead_are_the_maps_rendered_inline(
    twins: tuple[Cluster, Cluster], monkeypatch: pytest.MonkeyPatch
) -> None:
    ahead, inline = twins
    publish(inline)
    got = taken(monkeypatch)
    publish(ahead)
    assert got == list(MAPS)  # not vacuous: every map came from the child
    assert release(ahead) == release(inline)
    assert not (ahead.repo / "mx" / render.SCRATCH).exists()
    # A second release (serial 2 in every header) too, after a change.
    for c in twins:
        engine = create_engine(c.db_url)
        with engine.begin() as conn:
            conn.execute(insert(t.account).values(domain_id=1, local_part="zed", status="active"))
        engine.dispose()
    monkeypatch.setattr(render, "MIN_ROWS", 10**9)
    publish(inline)
    monkeypatch.setattr(render, "MIN_ROWS", 0)
    got.clear()
    publish(ahead)
    assert got == list(MAPS)
    assert release(ahead) == release(inline)
    assert text.header("recipients", "mx", 2).encode() in release(ahead)[0]["recipients"]


def test_a_map_the_child_fails_is_rendered_by_the_parent(
    twins: tuple[Cluster, Cluster], monkeypatch: pytest.MonkeyPatch
) -> None:
    ahead, inline = twins
    publish(inline)
    got = taken(monkeypatch)
    parent = os.getpid()
    real = render.render

    def fails_in_child(job: render.Job, *args):  # type: ignore[no-untyped-def]
        if os.getpid() != parent and job.name == "virtual":
            raise RuntimeError("child trouble")
        return real(job, *args)

    monkeypatch.setattr(render, "render", fails_in_child)
    publish(ahead)
    assert got == ["domains", "recipients"]  # the child stopped at virtual
    assert release(ahead) == release(inline)


def test_skipped_rows_and_refusals_are_the_parents(
    twins: tuple[Cluster, Cluster], monkeypatch: pytest.MonkeyPatch
) -> None:
    ahead, inline = twins
    for c in twins:
        engine = create_engine(c.db_url)
        with engine.begin() as conn:
            conn.execute(
                insert(t.account).values(domain_id=1, local_part="bad user", status="active")
            )
        engine.dispose()
    got = taken(monkeypatch)
    with pytest.raises(InvalidData, match="bad user"):
        publish(ahead)
    assert not (ahead.repo / "mx" / render.SCRATCH).exists()
    assert not (ahead.repo / "mx" / "LATEST").exists()
    publish(ahead, skip_invalid=True)
    assert got == []  # rendered from the view without the bad row, in the parent
    monkeypatch.setattr(render, "MIN_ROWS", 10**9)
    publish(inline, skip_invalid=True)
    assert release(ahead) == release(inline)
