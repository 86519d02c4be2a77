"""Plain photographs (JPEG, PNG) as instances, for the skin route and training sets (torch-free, no pixel decode).

A photograph has no DICOM UIDs, so it gets UIDs under the 2.25 root (UUID-derived OIDs, valid DICOM UIDs): the SOP
Instance UID from the file's content, so the same photo at two paths is one instance; the study UID from its folder.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

MAGIC = {b"\x89PNG\r\n\x1a\n": "png", b"\xff\xd8\xff": "jpeg"}


def photo_kind(path: Path) -> str | None:
    """'png' or 'jpeg' by content (not extension), else None."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError:
        return None
    for magic, kind in MAGIC.items():
        if head.startswith(magic):
            return kind
    return None


def uid_from(data: bytes) -> str:
    """A DICOM UID under 2.25 from a 128-bit hash."""
    return "2.25." + str(int.from_bytes(hashlib.sha256(data).digest()[:16], "big"))


def photo_uids(path: Path) -> tuple[str, str]:
    """(SOP Instance UID from the content, Study Instance UID from the folder)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return uid_from(h.digest()), uid_from(str(path.resolve().parent).encode())
