"""Base class of the maps.

A map must provide:

- ``spec``: its :class:`~mapsync.release.MapSpec` in the release catalogue
  (:data:`mapsync.release.BUILTIN_MAPS`), the plain facts publisher and agent both know, which
  give the map its
  - ``name``: the catalogue name, which is also its text file name (``transport``) and, with
    ``.cdb``, its cdb file name (``transport.cdb``);
  - ``cdb``: whether a cdb is built beside the text (Postfix/Exim maps) or it is text only
    (Dovecot passwd-files);
  - ``secrets``: whether it carries password hashes (only channels that list it get them);
  - ``separator``: between key and value on a text line: ``" "`` (Postfix source format) or
    ``":"`` (Dovecot passwd-file, whose value is the remaining six fields);
  - ``exceptions``: its entries are exceptions (a deny list): it may be empty and may shrink
    at will (``min_entries`` 0, ``max_shrink`` 100 %) unless ``[publisher.guards.<map>]``
    says otherwise; growth and changes stay guarded (a mass denial locks users out);
- ``reads``: what its entries are made of, for ``publish --skip-invalid`` to skip an invalid
  row only in the channels whose maps use it: table names (``account``: the rows, their
  addresses and state) and ``table.column`` for a column only some maps carry
  (``account.password_hash``); see :class:`mapsync.validate.Problem` ``field``;
- ``per_mailstore``: whether it holds only the rows of the channel's ``mailstore`` (when the
  channel names one), so a skipped row of another mailstore is not this channel's;
- ``entries(directory, channel)``: the (key, value) pairs, in any order; keys lowercase.

The publisher sorts the entries bytewise, refuses duplicate keys, and writes text and cdb.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable

from mapsync.config import PublisherChannel
from mapsync.maps.directory import Directory
from mapsync.release import MapSpec


class Map(ABC):
    """One lookup table the daemons read; see the module docstring."""

    spec: MapSpec
    # Every table, until a map says less: an undeclared map is skipped around as before.
    reads: frozenset[str] = frozenset(
        {"domain", "account", "alias", "forward", "mailstore", "sender_grant"}
    )
    per_mailstore: bool = False
    description: str = ""
    # Every entry's value, for a map with one value for all (recipients: "OK"): the publisher
    # then renders from :meth:`keys`, holding no (key, value) pair per row.
    constant_value: str | None = None

    @property
    def name(self) -> str:
        """The catalogue name, also the text file's name."""
        return self.spec.name

    @property
    def cdb(self) -> bool:
        """Whether a cdb is built beside the text (Postfix and Exim maps)."""
        return self.spec.cdb

    @property
    def secrets(self) -> bool:
        """Whether it carries password hashes."""
        return self.spec.secret

    @property
    def separator(self) -> str:
        """What separates key and value on a text line."""
        return self.spec.separator

    @property
    def exceptions(self) -> bool:
        """Whether its entries are exceptions (a deny list: may be empty, may shrink)."""
        return self.spec.exceptions

    @abstractmethod
    def entries(self, directory: Directory, channel: PublisherChannel) -> Iterable[tuple[str, str]]:
        """Yield (key, value) pairs for ``channel``."""

    def keys(self, directory: Directory, channel: PublisherChannel) -> Iterable[str]:
        """The keys of :meth:`entries` (of a map whose every value is :attr:`constant_value`)."""
        return (key for key, _ in self.entries(directory, channel))
