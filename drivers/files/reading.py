"""Reading what the filesystem has now: a config file's bytes, refused safely, the Entry
they make, and a watched directory's identity. Runs on the driver's worker thread only."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import uuid

from virtpub.drivers.files.config_files import MAX_BYTES, Format, Rejection, parse
from virtpub.drivers.files.rules import Config, Entry

_NAME_NAMESPACE = uuid.UUID("5a426fdb-fbd6-4cf8-9a7f-8818ecfebf2f")


def read_config(path: str) -> bytes | Rejection | None:  # noqa: PLR0911 - one return per kind of rejection
    """The file's bytes, a Rejection, or None when it does not exist.

    Symbolic links are refused, not followed: inotify on this directory would
    not see their target change, and a link can point anywhere (a FIFO, a
    device, a huge file). O_NONBLOCK keeps a FIFO from blocking the open.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as err:
        if err.errno == errno.ELOOP:
            return Rejection("symlink", "a symbolic link; only regular files are read")
        return Rejection("unreadable", f"cannot open: {os.strerror(err.errno or 0)}")
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return Rejection("not_regular", "not a regular file")
        if info.st_size > MAX_BYTES:
            return Rejection("too_large", f"larger than {MAX_BYTES} bytes")
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_BYTES:
            chunk = os.read(fd, MAX_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > MAX_BYTES:
            return Rejection("too_large", f"larger than {MAX_BYTES} bytes")
        return b"".join(chunks)
    except OSError as err:
        return Rejection("unreadable", f"cannot read: {os.strerror(err.errno or 0)}")
    finally:
        os.close(fd)


def examine(path: str, fmt: Format, previous: Entry | None, host_id: str) -> Entry | None:
    """What the file at `path` says now; None when it does not exist. A refused file keeps
    the last valid config it had, so a botched edit is not an undefine. An xl file without a
    UUID is identified by a UUID derived from the host and its name."""
    last_valid = previous.config if previous is not None else None
    data = read_config(path)
    if data is None:
        return None
    if isinstance(data, Rejection):
        return Entry(last_valid, data)
    parsed = parse(fmt, data)
    if isinstance(parsed, Rejection):
        return Entry(last_valid, parsed)
    domain = parsed.uuid or str(uuid.uuid5(_NAME_NAMESPACE, f"{host_id}/{parsed.name}"))
    digest = hashlib.sha256(data).digest()
    return Entry(Config(path, fmt, domain, parsed.name, parsed.uuid is None, digest), None)


def inspect_directory(directory: str) -> tuple[int, int] | str:
    """The directory's identity (device, inode) if it can be watched now, else why not."""
    try:
        info = os.stat(directory)
    except FileNotFoundError:
        return f"{directory} does not exist"
    except OSError as err:
        return f"{directory}: {err.strerror or err}"
    if not stat.S_ISDIR(info.st_mode):
        return f"{directory} is not a directory"
    return (info.st_dev, info.st_ino)
