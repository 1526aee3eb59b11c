"""What every user of kernels/*.cu needs: where they are, the grid arithmetic, and the source text.

Each kernels/<file>.cu starts with `#include "common.cuh"` and compiles alone with
`nvcc -I kernels --ptx kernels/<file>.cu`. CuPy (NVRTC) and the emulator get kernel_source(file)
instead: the same file with that #include replaced by common.cuh's text. Both key their compile
caches on the text they are given, so with the header pasted in, an edit of common.cuh recompiles
every module; behind an #include they would go on using the stale build.
"""

import os
import re

KERNEL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")

_INCLUDE_RE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"([^"]+)"[ \t]*$', re.M)


def ceil_div(m, n):
    """The number of blocks of n that cover m: the grid size of a launch with one thread (or warp) per item."""
    return (m + n - 1) // n


def kernel_source(file, kernel_dir=KERNEL_DIR):
    """The text of kernels/<file>.cu with each `#include "x"` of a file in kernel_dir replaced by that
    file's text, once (common.cuh has an include guard; a second copy would be empty anyway).
    #line directives around the pasted text keep compiler messages pointing at the right file and
    line: an error in warp_sum reads "common.cuh(21)", one in the kernel "<file>.cu(40)".
    kernel_dir: another folder of kernels, e.g. an edited copy to check (dev/check_kernel.py --kernel_dir)."""
    name = file + ".cu"
    with open(os.path.join(kernel_dir, name)) as f:
        text = f.read()
    return _expand(text, name, kernel_dir, seen=set())


def _expand(text, name, kernel_dir, seen):
    out, start = [], 0
    for m in _INCLUDE_RE.finditer(text):
        header = m.group(1)
        path = os.path.join(kernel_dir, header)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{name}: #include \"{header}\": no such file in {kernel_dir}")
        out.append(text[start:m.start()])
        if header not in seen:
            seen.add(header)
            with open(path) as f:
                body = _expand(f.read(), header, kernel_dir, seen)
            out.append(f'#line 1 "{header}"\n{body.rstrip(chr(10))}\n')
        line_after = text.count("\n", 0, m.end()) + 2           # the line that follows the #include
        out.append(f'#line {line_after} "{name}"')
        start = m.end()
    out.append(text[start:])
    return "".join(out)
