"""Keeping resident memory to what a node holds: a worker its slice, the root none of the workers'.
Linux-specific and best effort: elsewhere these do nothing."""

from __future__ import annotations

import ctypes
import gc
import os
import sys

import numpy as np

_MADV_PAGEOUT = 21   # Linux >= 5.4
_PAGE = 4096


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def release_pages(raw: np.ndarray) -> None:
    """Drop the pages under `raw` from this process's resident set. MADV_PAGEOUT reclaims without losing
    data whatever backs the memory: a view of a memory-mapped file is read again from the file if it is
    needed later."""
    libc = _libc()
    if libc is None or raw.nbytes < 1 << 16:
        return
    start = raw.ctypes.data // _PAGE * _PAGE
    end = -(-(raw.ctypes.data + raw.nbytes) // _PAGE) * _PAGE
    libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_PAGEOUT)


def trim_heap() -> None:
    """Give the heap's free pages back to the OS: the buffers of a slice's tensors (received, or cut by
    columns) leave holes in glibc's heaps that it keeps otherwise."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def available_bytes() -> int | None:
    """Memory this process can still take without swapping or being killed: Linux MemAvailable (which
    counts reclaimable page cache), lowered to the room left under any cgroup memory limit on this
    process's cgroup or its ancestors (a systemd unit's MemoryMax=, a container's --memory: the machine's
    free memory is not this process's to take). Else the free pages; None where nothing is known."""
    avail = _meminfo_available()
    room = cgroup_room()
    if room is not None:
        avail = room if avail is None else min(avail, room)
    return avail


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


# (limit file, usage file, the memory.stat key of its reclaimable file cache) of the cgroup v2 and v1
# memory controllers
_V2 = ("memory.max", "memory.current", "inactive_file")
_V1 = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
_UNLIMITED = 1 << 62      # v1 writes "no limit" as the largest page-aligned 64-bit value


def cgroup_room(proc: str = "/proc/self") -> int | None:
    """Bytes left under the tightest memory limit of the cgroup of process `proc` and its ancestors (limit
    minus usage, each level counting its whole subtree), v2 or v1; None where no limit is set or readable."""
    rooms = [_room(d, files) for d, files in _memory_cgroup_dirs(proc)]
    rooms = [r for r in rooms if r is not None]
    return min(rooms) if rooms else None


def _room(directory: str, files) -> int | None:
    try:
        with open(os.path.join(directory, files[0])) as f:
            limit = f.read().strip()
        if limit == "max" or int(limit) >= _UNLIMITED:
            return None
        with open(os.path.join(directory, files[1])) as f:
            usage = int(f.read())
    except (OSError, ValueError):
        return None
    # usage counts the page cache of every file read in the group (a model file, logs); its inactive part
    # is given back under pressure, as MemAvailable counts it, so it is room
    return max(int(limit) - usage + _stat(directory, files[2]), 0)


def _stat(directory: str, key: str) -> int:
    try:
        with open(os.path.join(directory, "memory.stat")) as f:
            for line in f:
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _memory_cgroup_dirs(proc: str):
    """(directory, files) of the process's memory cgroup and each ancestor up to its mount's root."""
    try:
        with open(f"{proc}/cgroup") as f:
            memberships = [line.rstrip("\n").split(":", 2) for line in f]
        with open(f"{proc}/mountinfo") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return []
    out = []
    for fields in mounts:
        # mountinfo: id parent dev root mountpoint options [optional...] - fstype source superoptions
        try:
            sep = fields.index("-")
            fstype, root, point, opts = fields[sep + 1], fields[3], fields[4], fields[sep + 3].split(",")
        except (ValueError, IndexError):
            continue
        if fstype == "cgroup2":
            paths, files = [p for h, c, p in _wellformed(memberships) if h == "0" and c == ""], _V2
        elif fstype == "cgroup" and "memory" in opts:
            paths, files = [p for h, c, p in _wellformed(memberships) if "memory" in c.split(",")], _V1
        else:
            continue
        for path in paths:
            # a mount of a subtree (a container's view) has that subtree's root as its own
            rel = path[len(root):] if root != "/" and path.startswith(root) else path
            parts = [p for p in rel.split("/") if p and p != ".."]
            out += [(os.path.join(point, *parts[:n]), files) for n in range(len(parts), -1, -1)]
    return out


def _wellformed(memberships):
    return [m for m in memberships if len(m) == 3]


def freeze_survivors() -> None:
    """Collect, then keep what is alive now (the loaded slice, compiled kernels, numba's and the tokenizer's
    objects: 112,000 on the 1B shape) out of every later collection. A full collection walks them all, 50 ms
    measured on a worker and on the root of the 1B shape, and one comes within the first tokens after a
    load: on a cluster a pause of one node holds up every other. `thaw` undoes it when the slice goes."""
    gc.collect()
    gc.freeze()


def thaw() -> None:
    """Let the collector see the frozen objects again (a slice being freed: its cycles must be collectable)."""
    gc.unfreeze()
