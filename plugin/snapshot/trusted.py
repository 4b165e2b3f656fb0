"""Trusted directories and files: what a snapshot path must be before we read or write it.

The snapshot directory is a local attack surface (/dev/shm is shared by every user of the host):
a directory we use must be ours (owned by this user, not a symlink, not writable by group or
others), and its ancestors must be owned by root or us and, if writable by others, sticky; files
are opened relative to the checked directory with O_NOFOLLOW (and O_NONBLOCK, so a FIFO cannot
hang a scrape), must be regular files of ours, and are read up to MAX_SNAPSHOT_BYTES. What is
refused says why (`SnapshotRefused.reason`, one of REASONS: the exported label).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

MAX_SNAPSHOT_BYTES = 8 * 1024 * 1024
"""Read cap per rank file: a 61-layer, 256-expert rank with every live gauge is under 1 MiB, and
the cap keeps a scrape well under 100 ms whatever a file holds (also its unpacked npz members)."""
REASONS = ("symlink", "foreign_owner", "writable_by_others", "not_a_regular_file", "too_large",
           "corrupt", "unreadable", "over_budget")
RUN_DIR_RE = re.compile(r"^(\d+)-[0-9a-f]+$")
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class SnapshotRefused(OSError):
    """A snapshot path we will not trust; `reason` is one of REASONS (the exported label)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _check_ours(st: os.stat_result, what: str) -> None:
    if st.st_uid != os.geteuid():
        raise SnapshotRefused("foreign_owner", f"{what} is owned by uid {st.st_uid}, not by us "
                                               f"(uid {os.geteuid()})")
    if st.st_mode & 0o022:
        raise SnapshotRefused("writable_by_others", f"{what} is writable by group or others "
                                                    f"(mode {stat.S_IMODE(st.st_mode):o})")


def _check_ancestors(path: Path) -> None:
    """Every existing ancestor of `path` must be root's or ours, and sticky if others can write."""
    p = Path(os.path.realpath(path))
    for anc in [p, *p.parents]:
        try:
            st = os.stat(anc)
        except FileNotFoundError:
            continue
        if st.st_uid not in (0, os.geteuid()):
            raise SnapshotRefused("foreign_owner", f"{anc} is owned by uid {st.st_uid}")
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise SnapshotRefused("writable_by_others", f"{anc} is writable by others and not "
                                                        "sticky")


def _why_not(dir_fd: int, name: str, what: str, exc: OSError) -> SnapshotRefused:
    """Why an open failed, as a refusal reason (a symlink, someone else's, or unreadable)."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return SnapshotRefused("unreadable", f"{what}: {exc.strerror or exc}")
    if stat.S_ISLNK(st.st_mode):
        return SnapshotRefused("symlink", f"{what} is a symlink")
    if st.st_uid != os.geteuid():
        return SnapshotRefused("foreign_owner", f"{what} is owned by uid {st.st_uid}, not by us")
    if isinstance(exc, NotADirectoryError):
        return SnapshotRefused("not_a_regular_file", f"{what} is not a directory")
    return SnapshotRefused("unreadable", f"{what}: {exc.strerror or exc}")


def _open_subdir(parent_fd: int, name: str, what: str, create: bool) -> int:
    """openat(name) as a directory we own, without following a symlink; mkdir 0700 if asked."""
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=parent_fd)
    try:
        fd = os.open(name, _O_DIR, dir_fd=parent_fd)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise _why_not(parent_fd, name, what, exc) from None
    try:
        _check_ours(os.fstat(fd), what)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_dir(directory: Path, create: bool = False) -> int:
    """A file descriptor of `directory` (<base>/<run id>, or a base alone) after every check.

    Raises FileNotFoundError when it does not exist (and `create` is false), SnapshotRefused when
    it or an ancestor is not trustworthy.
    """
    directory = Path(os.path.abspath(directory))
    ours = [directory.parent, directory] if RUN_DIR_RE.match(directory.name) else [directory]
    top = ours[0].parent
    if create:
        top.mkdir(parents=True, exist_ok=True, mode=0o700)
    _check_ancestors(top)
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for d in ours:
            nxt = _open_subdir(fd, d.name, str(d), create)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def _open_ours(dfd: int, name: str) -> Iterator[tuple[io.BufferedReader, os.stat_result]]:
    """A file of ours in a checked directory, open: regular, not a symlink, our owner."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise _why_not(dfd, name, name, exc) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise SnapshotRefused("not_a_regular_file", f"{name} is not a regular file")
    with os.fdopen(fd, "rb") as f:
        _check_ours(st, name)
        yield f, st


def _read_capped(f: io.BufferedReader, st: os.stat_result, name: str, max_bytes: int) -> bytearray:
    """The whole file, at most `max_bytes`, read once into a writable buffer: decoding views its
    totals in place (zipfile's copy and CRC of each member were half of a decode)."""
    if st.st_size > max_bytes:
        raise SnapshotRefused("too_large", f"{name} has {st.st_size} bytes, over the "
                                           f"{max_bytes}-byte cap")
    buf = bytearray(st.st_size + 1)  # one byte more: a file that grew since fstat shows it
    n = f.readinto(buf)
    del buf[n:]
    if n > st.st_size:
        buf += f.read(max_bytes + 1 - n)
    if len(buf) > max_bytes:
        raise SnapshotRefused("too_large", f"{name} grew over the {max_bytes}-byte cap")
    return buf


def read_trusted(dfd: int, name: str, max_bytes: int = MAX_SNAPSHOT_BYTES
                 ) -> tuple[bytearray, os.stat_result]:
    """A file of ours in a checked directory: regular, not a symlink, at most `max_bytes`."""
    with _open_ours(dfd, name) as (f, st):
        return _read_capped(f, st, name, max_bytes), st
