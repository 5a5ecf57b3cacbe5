"""The patch of a release's manifest from the previous one's (docs/release-format.md,
"Patches").

A node that holds the previous release (its rsync basis) needs of the next one's manifest
only the lines that changed: the times, the serials, the changed maps' hashes and sizes, the
patches. The rest, the unchanged maps' hashes above all, it has. This patch is what travels
instead of the manifest in the pull of one new release (about 500 bytes less than the
manifest itself, compressed, at 1M accounts)::

    mapsync-manifest-patch 1 from SERIAL
    =N          copy the old manifest's next N lines
    -N          drop the old manifest's next N lines
    +LINE       write LINE

ending with the old manifest consumed to its end. Lines are the manifest's bytes split at
``\\n`` (the last, after the final newline, is empty), so the result is exact byte for byte.
A patch is not signed itself: the manifest it gives must have the sha256 that ``LATEST``
names, and then the signature verifies it as ever. Parsing is strict and bounded (at most
:data:`MAX_MANIFEST_BYTES` in and out); any fault is a :class:`VerificationError` naming the
patch and its line, and the agent then fetches the manifest itself.
"""

from __future__ import annotations

import difflib
import re

from mapsync.errors import VerificationError
from mapsync.release.format import MAX_MANIFEST_BYTES

MAGIC = b"mapsync-manifest-patch 1 from "
_HEADER = re.compile(rb"mapsync-manifest-patch 1 from ([1-9][0-9]{0,17})\Z")
_COUNT = re.compile(rb"[1-9][0-9]{0,6}\Z")


# Manifests larger than this travel whole: difflib's time grows faster than their size (a
# 350 KB one all changed: 0.9 s), and a channel's is a few KB (4 maps: 2.8 KB).
MAX_PATCHED = 64 * 1024


def make_manifest_patch(old: bytes, new: bytes, base: int) -> bytes | None:
    """The patch that turns manifest bytes ``old`` (of serial ``base``) into ``new``; None
    where it would not pay (either over :data:`MAX_PATCHED`, or the patch no smaller than
    ``new``)."""
    if max(len(old), len(new)) > MAX_PATCHED:
        return None
    patch = diff(old, new, base)
    return patch if len(patch) < len(new) else None


def diff(old: bytes, new: bytes, base: int) -> bytes:
    """The patch that turns manifest bytes ``old`` (of serial ``base``) into ``new``."""
    a, b = old.split(b"\n"), new.split(b"\n")
    out = [MAGIC + str(base).encode()]
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b).get_opcodes():
        if op == "equal":
            out.append(b"=%d" % (i2 - i1))
            continue
        if i2 > i1:
            out.append(b"-%d" % (i2 - i1))
        out += (b"+" + line for line in b[j1:j2])
    return b"\n".join(out) + b"\n"


def patch_base(patch: bytes) -> int | None:
    """The serial whose manifest ``patch`` applies to (None: not a manifest patch)."""
    m = _HEADER.match(patch[: patch.find(b"\n")]) if b"\n" in patch else None
    return int(m.group(1)) if m else None


def apply_manifest_patch(old: bytes, patch: bytes, where: str) -> bytes:
    """The manifest bytes ``patch`` (the file ``where``) makes of ``old``."""
    if len(patch) > MAX_MANIFEST_BYTES:
        raise VerificationError(f"{where}: larger than {MAX_MANIFEST_BYTES} bytes")
    if not patch.endswith(b"\n"):
        raise VerificationError(f"{where}: does not end with a newline (cut short)")
    lines = patch[:-1].split(b"\n")
    if patch_base(patch) is None:
        raise VerificationError(f"{where}: line 1: not a manifest patch ({MAGIC.decode()}N)")
    a = old.split(b"\n")
    out: list[bytes] = []
    pos = size = 0
    for number, line in enumerate(lines[1:], start=2):
        op, arg = line[:1], line[1:]
        if op == b"+":
            out.append(arg)
            size += len(arg) + 1
        elif op in (b"=", b"-") and _COUNT.match(arg):
            n = int(arg)
            if pos + n > len(a):
                raise VerificationError(
                    f"{where}: line {number}: {line.decode(errors='replace')!r} goes past the "
                    f"end of the previous manifest ({len(a)} lines)"
                )
            if op == b"=":
                out += a[pos : pos + n]
                size += sum(len(x) + 1 for x in a[pos : pos + n])
            pos += n
        else:
            raise VerificationError(
                f"{where}: line {number}: not '=N', '-N' or '+LINE': "
                f"{line[:60].decode(errors='replace')!r}"
            )
        if size > MAX_MANIFEST_BYTES + 1:
            raise VerificationError(f"{where}: gives more than {MAX_MANIFEST_BYTES} bytes")
    if pos != len(a):
        raise VerificationError(
            f"{where}: ends at line {pos} of the previous manifest's {len(a)}: cut short"
        )
    return b"\n".join(out)
