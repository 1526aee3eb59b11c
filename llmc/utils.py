"""What every program shares beneath the file formats (llm.c's llmc/utils.h): the two kinds of
one-line error, and writing a file so that no half-written copy is ever left behind."""

import os

import numpy as np


class FormatError(ValueError):
    """A .bin file that is not what its reader expects; the message is one line."""


class ConfigError(ValueError):
    """A run that cannot work as asked (shapes, flags, data); the message is one line."""


def write_atomic(path, chunks):
    """Write the byte chunks (NumPy arrays) to `path` through a temporary name, then rename, so a
    crash or a full disk never leaves a half file where a good one was expected."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(memoryview(np.ascontiguousarray(chunk)).cast("B"))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
