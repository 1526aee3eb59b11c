"""What every program shares beneath the file formats (llm.c's llmc/utils.h): the kinds of one-line
error, and writing a file so that no half-written copy is ever left behind."""

import errno
import os
import shutil

import numpy as np


class FormatError(ValueError):
    """A .bin file that is not what its reader expects; the message is one line."""


class ConfigError(ValueError):
    """A run that cannot work as asked (shapes, flags, data); the message is one line."""


class WriteError(OSError):
    """Writing a file failed (a full disk, no permission, a folder in the way): the message is one line
    saying what, where and how much room it needed. Nothing half-written is left under the file's name."""


def human_bytes(n):
    """1536 -> '1.5 KiB': sizes in messages."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024


def _write_failure(path, error, written, need):
    """The one line of a failed write: what went wrong, the room the file needed and the room there is."""
    directory = os.path.dirname(os.path.abspath(path))
    why = "the disk is full" if error.errno in (errno.ENOSPC, errno.EDQUOT) else (error.strerror or str(error))
    size = f"{human_bytes(need)} needed" if need is not None else f"stopped after {human_bytes(written)}"
    try:
        free = f", {human_bytes(shutil.disk_usage(directory).free)} free there"
    except OSError:
        free = ""
    return f"could not write {path}: {why} ({size}{free}); nothing was left half-written under that name"


def write_atomic(path, chunks):
    """Write the byte chunks (NumPy arrays, a list or a generator) to `path` through a temporary name,
    then rename, so a crash or a full disk never leaves a half file where a good one was expected. A
    failure is one WriteError line, and the temporary file is removed."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp{os.getpid()}"
    need = sum(np.asarray(c).nbytes for c in chunks) if isinstance(chunks, (list, tuple)) else None
    written = 0
    try:
        os.makedirs(directory, exist_ok=True)
        with open(tmp, "wb") as f:
            for chunk in chunks:
                written += f.write(memoryview(np.ascontiguousarray(chunk)).cast("B"))
        os.replace(tmp, path)
    except OSError as e:
        raise WriteError(_write_failure(path, e, written, need)) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
