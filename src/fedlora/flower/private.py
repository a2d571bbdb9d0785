"""Files only their owner may read: folders of mode 700 and files of mode 600, never reached through
a symbolic link (for keys: the SuperLink's TLS key, a SuperNode's key, the model keeper's).

Light to import (the standard library only): the model keeper uses it before anything else
loads.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def private_folder(folder: Path) -> Path:
    """``folder`` for private files: created ``0700``; an existing one must be a real folder
    (not a symbolic link), owned by this user, that only its owner can enter."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode):
        raise FileExistsError(f"{folder} is not a folder (a symbolic link?); choose another")
    if info.st_uid != os.getuid():
        raise PermissionError(f"{folder} belongs to another user; choose another")
    if info.st_mode & 0o077:
        raise PermissionError(
            f"{folder} can be entered by others (mode {stat.S_IMODE(info.st_mode):o}); private "
            f"files are written only into a folder of mode 700 (chmod 700 {folder})"
        )
    return folder


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by its owner alone from the first byte: opened with
    mode ``0600`` and without following a symbolic link (an attacker's link is refused, never
    written through), an existing file set to ``0600`` before anything is written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def read_private(path: Path) -> bytes:
    """``path``'s bytes, refusing a symbolic link."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)
