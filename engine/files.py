"""Writing files so that nothing the user had is lost.

Every output (images, exported artifacts, cache entries) is written to a
hidden temporary file beside its destination and then renamed into place:
a crash mid-write never leaves half a file under the user's name, and an
existing file is replaced only when asked to.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable, Union

from .errors import UserError, flag

PathLike = Union[str, os.PathLike]


def check_writable(path: PathLike, overwrite: bool, what: str = "output") -> Path:
    """Fail before any work when ``path`` cannot be (over)written as asked."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {str(path)!r} is a directory")
    if path.exists() and not overwrite:
        raise UserError(f"{what} {str(path)!r} already exists; pass {flag('overwrite')} to replace it")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"{what} directory {str(parent)!r} does not exist")
    # Probed by really creating a file: os.access answers for permission bits only, and says yes to root
    # on read-only mounts and pseudo-filesystems, where the write would then fail after all the work.
    try:
        fd, tmp = create_temporary(path)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise UserError(f"{what} directory {str(parent)!r} is not writable ({exc.strerror or exc})") from None
    return path


def write_atomically(path: PathLike, write: Callable[[BinaryIO], None], overwrite: bool, what: str = "output") -> Path:
    """Call ``write(fh)`` on a temporary file beside ``path``, then rename it to ``path``.

    Without ``overwrite`` the rename cannot clobber a file that appeared while
    ``write`` ran: that raises the same ``UserError`` as an existing file.
    """
    path = Path(path)
    try:
        fd, tmp = create_temporary(path)
    except OSError as exc:
        raise UserError(f"could not create a file beside {what} {str(path)!r} ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        publish(tmp, path, overwrite, what)
    except OSError as exc:  # disk full, quota, I/O error: one sentence, and no half file left behind
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise UserError(f"could not write {what} {str(path)!r} ({exc.strerror or exc})") from None
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def create_temporary(path: Path) -> tuple[int, str]:
    """A new, hidden ``.NAME.XXXX.part`` beside ``path``, opened for writing.

    Not tempfile.mkstemp: it creates files 0600 and the rename would keep that, so results would be
    private to their owner; os.open with 0666 lets the umask decide, as for any file a program writes.
    """
    for _ in range(100):
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.part")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def publish(tmp: str, path: Path, overwrite: bool, what: str = "output") -> None:
    """Rename the finished ``tmp`` to ``path`` (never over an existing file unless ``overwrite``)."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        # link() fails if the name appeared meanwhile: no race can clobber a file.
        os.link(tmp, path)
    except FileExistsError:
        raise UserError(f"{what} {str(path)!r} already exists; pass {flag('overwrite')} to replace it") from None
    except OSError:  # filesystems without hard links: check, then rename
        if path.exists():
            raise UserError(f"{what} {str(path)!r} already exists; pass {flag('overwrite')} to replace it") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)
