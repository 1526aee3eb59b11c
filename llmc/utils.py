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


def write_failure(path, error, written, need):
    """The one line of a failed write: what went wrong, the room the file needed and the room there is."""
    directory = os.path.dirname(os.path.abspath(path))
    why = "the disk is full" if error.errno in (errno.ENOSPC, errno.EDQUOT) else (error.strerror or str(error))
    size = f"{human_bytes(need)} needed" if need is not None else f"stopped after {human_bytes(written)}"
    try:
        free = f", {human_bytes(shutil.disk_usage(directory).free)} free there"
    except OSError:
        free = ""
    return f"could not write {path}: {why} ({size}{free})"


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
        raise WriteError(write_failure(path, e, written, need)) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ----------------------------------------------------------------------------
# output paths: a program replaces or deletes only what it wrote itself


class OutputInUse(WriteError):
    """An output path holds something the program did not write, so it will not replace or delete it:
    the message is one line naming the path and what was found there, and nothing was written."""


def file_starts_with(path, head):
    """Does the file at `path` begin with the bytes `head` (a PNG's signature, a magic number)?"""
    try:
        with open(path, "rb") as f:
            return f.read(len(head)) == head
    except OSError:
        return False


def has_magic(path, magic):
    """Does the file at `path` start with llm.c's int32 `magic`, the first number of every .bin header?"""
    return file_starts_with(path, int(magic).to_bytes(4, "little"))


def is_own_file(path, ours):
    """Is `path` a regular file (not a link, not a folder) that ours(path) accepts as the program's
    own output (its name, its format)? Such a file may be replaced or removed; nothing else may."""
    return os.path.isfile(path) and not os.path.islink(path) and bool(ours(path))


def foreign_entries(folder, ours):
    """The names of the entries of `folder` that are not the program's own files (is_own_file), sorted,
    a subfolder's with a "/": [] when the folder is empty or not there. A program that would replace or
    empty the folder refuses when this is not []."""
    if not os.path.isdir(folder):
        return []
    return sorted(e.name + ("/" if e.is_dir(follow_symlinks=False) else "")
                  for e in os.scandir(folder) if not is_own_file(e.path, ours))


def some_names(names, n=3):
    """'a, b, c and 4 more': the first n of a list of names, for a one-line message."""
    shown = ", ".join(names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def refuse_foreign_files(paths, ours, what, hint):
    """Raise OutputInUse when one of the output files `paths` is there and is not the program's own:
    '<paths>: not <what>, so not this program's to replace; nothing was written: <hint>'."""
    found = [p for p in paths if os.path.lexists(p) and not is_own_file(p, ours)]
    if found:
        raise OutputInUse(f"{some_names(found)}: not {what}, so not this program's to replace; "
                          f"nothing was written: {hint}")


def one_line_errors(main):
    """A script's main(argv=None), wrapped: a one-line error (ConfigError, FormatError, an OSError such as
    WriteError and OutputInUse, or a SystemExit that carries a message) is printed as `error: <message>`
    on stderr and ends the program with exit status 1, in its tests (which call main) as on the command line."""
    import functools
    import sys

    @functools.wraps(main)
    def wrapped(argv=None):
        try:
            return main(argv)
        except (ConfigError, FormatError, OSError) as e:
            message = str(e)
        except SystemExit as e:
            if not isinstance(e.code, str):
                raise
            message = e.code
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)

    return wrapped
