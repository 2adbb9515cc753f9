"""Cache files with a SHA-256 beside them, written atomically and verified on every read.

A cache file ``<name>`` has its checksum in ``<name>.sha256`` (hex digest, as ``sha256sum`` writes it).
:func:`write_cached` writes the bytes to a temporary file in the same folder, fsyncs it, renames it over
the target, then does the same for the checksum; a crash in between leaves a file whose checksum does
not match, which the next read rebuilds. :func:`read_cached` returns the bytes only when they match
their checksum; an unreadable file, a missing checksum or a mismatch is logged as a warning naming the
file and the reason, and the caller rebuilds (``None``). Callers parse the bytes without unpickling
(``torch.load(weights_only=True)``, ``np.load(allow_pickle=False)``) and treat a parse error the same way.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from diffusionflow.paths import replace_atomically

__all__ = ["checksum_path", "read_cached", "write_cached"]

SUFFIX = ".sha256"


def checksum_path(path: str | Path) -> Path:
    """``<path>.sha256``: where the checksum of cache file ``path`` is kept."""
    path = Path(path)
    return path.with_name(path.name + SUFFIX)


def write_cached(path: str | Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` and its SHA-256 to ``<path>.sha256``, each atomically."""
    path = Path(path)
    replace_atomically(path, lambda f: f.write(data))
    digest = hashlib.sha256(data).hexdigest()
    replace_atomically(checksum_path(path), lambda f: f.write(f"{digest}  {path.name}\n".encode()))


def read_cached(path: str | Path, log: logging.Logger, what: str = "cache file") -> bytes | None:
    """The bytes of ``path`` if they match ``<path>.sha256``; ``None`` if ``path`` does not exist
    (silently) or cannot be trusted (a warning on ``log`` naming ``what``, the file and why: it is rebuilt).
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = path.read_bytes()
    except OSError as err:
        log.warning("%s %s is unreadable (%s): rebuilding it", what, path, err)
        return None
    try:
        stored = checksum_path(path).read_text().split()[0].lower()
    except (OSError, IndexError, UnicodeDecodeError) as err:
        reason = f"no readable checksum {checksum_path(path).name} ({type(err).__name__})"
        log.warning("%s %s has %s: rebuilding it", what, path, reason)
        return None
    actual = hashlib.sha256(data).hexdigest()
    if actual != stored:
        log.warning(
            "%s %s does not match its SHA-256 checksum (%s, stored %s; corrupted or truncated): "
            "rebuilding it",
            what,
            path,
            actual[:12],
            stored[:12],
        )
        return None
    return data
