"""Payload frames through shared memory between two processes of one host.

Loopback TCP copies every byte twice through the kernel (and CurveZMQ encrypts it on
one core); two processes of one host can instead share the pages. A sender writes a
large payload frame into a segment of its own (a file under ``/dev/shm``, mode 0600)
and sends a small reference in its place; the receiver maps the segment read-only and
decodes the array in place. The segment is the sender's until the receiver says it is
done with it (``shm_free``): the receiver tracks the arrays it decoded from the segment
and releases it once none is alive, whether that is before its reply (a push applied at
once) or long after (a push a sequential table keeps for the clock boundary, a pulled
array the user still holds). docs/protocol.md, "Shared memory".

Three parts, one job each:

- ``Pool``: the segments one connection sends from (created on demand, reused once
  released, counted against a per-process ``Budget``); named ``<prefix><n>`` where the
  prefix names the process (pid namespace, pid, start time) and the pool.
- ``Mapped``: the segments one peer sends from, as this side maps them: a reference
  naming a segment outside the peer's prefix, or a range outside the segment, or a file
  not owned by this user with mode 0600, is refused with ``ShmError``.
- ``sweep``: removes the segments of processes that are gone (SIGKILL leaves them
  behind); run by every process that uses shared memory at start, by servers every few
  seconds, and by ``LocalCluster`` when it closes.
"""
from __future__ import annotations

import atexit
import hashlib
import mmap
import os
import re
import secrets
import socket
import stat
import weakref
from dataclasses import dataclass

import msgpack
import numpy as np

from psd.errors import ShmError

SHM_DIR = "/dev/shm"
#: a reference frame is msgpack [name, offset]: never longer than this
MAX_REF_BYTES = 256
#: the smallest segment; larger ones are rounded up to 1/8 of their power of two
MIN_SEGMENT = 1 << 20
#: segments one receiver keeps mapped per peer; older mappings are dropped (their pages
#: stay until the arrays decoded from them die)
MAX_MAPPED = 64
_NAME = re.compile(r"psd-([0-9a-f]{8})-(\d+)-(\d+)-[0-9a-z.-]{1,80}")


@dataclass(frozen=True, slots=True)
class ShmSettings:
    """What a process may do with shared memory (config keys ``shm*``)."""

    enabled: bool = True
    #: payload frames of at least this many bytes go through shared memory
    min_bytes: int = MIN_SEGMENT
    #: segments this process holds in all, every pool together; past it frames go inline
    max_bytes: int = 2 << 30
    dir: str = SHM_DIR


# -- who this process is ---------------------------------------------------------------
def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def host_id() -> str:
    """Boot id, host name and network namespace: equal on both ends only for processes
    of one machine that also share its network (a process in another network namespace
    stands for another host: psd/testing/netcluster.py emulates hosts that way)."""
    try:
        net = os.readlink("/proc/self/ns/net")
    except OSError:
        net = "?"
    return f"{_read('/proc/sys/kernel/random/boot_id')}/{socket.gethostname()}/{net}"


def start_time(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (None: no such process, or one
    that died and was not yet reaped); with the pid it names one process even after the
    pid is reused."""
    text = _read(f"/proc/{pid}/stat")
    if not text:
        return None
    try:
        fields = text.rsplit(")", 1)[1].split()
        return None if fields[0] in ("Z", "X") else int(fields[19])  # (a zombie is gone too)
    except (IndexError, ValueError):
        return None


def alive(pid: int, start: int) -> bool:
    return start_time(pid) == start


def _namespace() -> str:
    """The pid namespace of this host we run in: pids in names mean something only there."""
    try:
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        ns = "?"
    return hashlib.sha1(f"{host_id()}|{ns}".encode()).hexdigest()[:8]


_ME: tuple[str, int, int] | None = None


def me() -> tuple[str, int, int]:
    """(namespace tag, pid, start time) of this process (computed again after a fork)."""
    global _ME
    pid = os.getpid()
    if _ME is None or _ME[1] != pid:
        _ME = (_namespace(), pid, start_time(pid) or 0)
    return _ME


def new_prefix() -> str:
    """A fresh pool prefix: ``psd-NS-PID-START-TOKEN.`` (the token keeps pools apart)."""
    ns, pid, start = me()
    return f"psd-{ns}-{pid}-{start}-{secrets.token_hex(6)}."


def owner_of(name: str) -> tuple[str, int, int] | None:
    m = _NAME.fullmatch(name)
    return (m[1], int(m[2]), int(m[3])) if m else None


def sweep(directory: str = SHM_DIR) -> list[str]:
    """Remove the segments of psd processes of this pid namespace that are gone; return
    their names. Segments of live processes, of other namespaces (whose pids we cannot
    judge) and files that are not psd's are left alone."""
    ns = me()[0]
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        owner = owner_of(name)
        if owner is None or owner[0] != ns or alive(owner[1], owner[2]):
            continue
        try:
            os.unlink(os.path.join(directory, name))
            removed.append(name)
        except OSError:
            pass
    return removed


def _segment_size(n: int) -> int:
    if n <= MIN_SEGMENT:
        return MIN_SEGMENT
    step = 1 << max(20, (n - 1).bit_length() - 3)
    return -(-n // step) * step


class Budget:
    """The settings, and the bytes of segments held, of the pools of one daemon or client
    (``settings.max_bytes`` bounds them together)."""

    __slots__ = ("settings", "limit", "used", "pools")

    def __init__(self, settings: ShmSettings) -> None:
        self.settings = settings
        self.limit = settings.max_bytes
        self.used = 0
        self.pools: "weakref.WeakSet[Pool]" = weakref.WeakSet()

    def make_room(self, wanted: int) -> bool:
        """Drop free segments of any pool (largest first) until ``wanted`` more bytes fit:
        a pool of a connection gone quiet must not keep others on TCP."""
        if self.used + wanted <= self.limit:
            return True
        free = sorted(((seg.size, id(pool), pool, seg) for pool in list(self.pools)
                       for seg in list(pool._segments.values()) if not seg.lent), key=lambda x: -x[0])
        for _, _, pool, seg in free:
            if self.used + wanted <= self.limit:
                break
            pool._drop(seg)
        return self.used + wanted <= self.limit


class _Segment:
    __slots__ = ("name", "size", "mm", "lent")

    def __init__(self, name: str, size: int, mm: mmap.mmap) -> None:
        self.name, self.size, self.mm, self.lent = name, size, mm, False


_POOLS: "weakref.WeakSet[Pool]" = weakref.WeakSet()


class Pool:
    """The segments one connection sends payloads from. ``place`` copies a buffer into a
    free segment (creating one within the budget) and returns the reference to send, or
    None: then the frame goes inline (TCP)."""

    def __init__(self, budget: Budget) -> None:
        self.settings = budget.settings
        self.budget = budget
        self.prefix = new_prefix()
        self._seq = 0
        self._segments: dict[str, _Segment] = {}
        self.placed = 0  # frames and bytes sent through shared memory
        self.placed_bytes = 0
        self.failed = 0  # frames that had to go inline (no room, creation failed)
        #: the receiving process (pid, start time), once the handshake named it: segments
        #: lent to a process that is gone are taken back
        self.peer: tuple[int, int] | None = None
        _POOLS.add(self)
        budget.pools.add(self)

    def place(self, buf) -> bytes | None:
        n = buf.nbytes
        seg = self._free(n) or self._create(n)
        if seg is None:
            self.failed += 1
            return None
        np.frombuffer(seg.mm, np.uint8, n)[:] = np.frombuffer(buf, np.uint8)
        seg.lent = True
        self.placed += 1
        self.placed_bytes += n
        return msgpack.packb([seg.name, 0])

    def _free(self, n: int) -> _Segment | None:
        best = None
        for seg in self._segments.values():
            if not seg.lent and seg.size >= n and (best is None or seg.size < best.size):
                best = seg
        return best

    def _create(self, n: int) -> _Segment | None:
        size = _segment_size(n)
        if not self.budget.make_room(size):
            return None
        self._seq += 1
        name = f"{self.prefix}{self._seq}"
        path = os.path.join(self.settings.dir, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except OSError:
            return None  # no such folder, no permission: inline
        try:
            # allocate now: a write into a mapped page a full tmpfs cannot back is SIGBUS
            os.posix_fallocate(fd, 0, size)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError):
            os.close(fd)
            _unlink(path)
            return None
        os.close(fd)
        seg = self._segments[name] = _Segment(name, size, mm)
        self.budget.used += size
        return seg

    def _drop(self, seg: _Segment) -> None:
        del self._segments[seg.name]
        self.budget.used -= seg.size
        _unlink(os.path.join(self.settings.dir, seg.name))
        try:
            seg.mm.close()
        except BufferError:
            pass  # a frame still being sent reads it: the mapping goes with its last user

    def release(self, names) -> int:
        """The receiver is done with these segments (names not ours are ignored)."""
        count = 0
        for name in names:
            seg = self._segments.get(name) if isinstance(name, str) else None
            if seg is not None and seg.lent:
                seg.lent = False
                count += 1
        return count

    def reclaim(self) -> bool:
        """Take back every segment when the receiving process is gone; True if it is."""
        if self.peer is None or alive(*self.peer):
            return False
        for seg in self._segments.values():
            seg.lent = False
        return True

    def lent(self) -> int:
        return sum(1 for s in self._segments.values() if s.lent)

    def names(self) -> list[str]:
        return list(self._segments)

    def close(self) -> None:
        for seg in list(self._segments.values()):
            self._drop(seg)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


@atexit.register
def _remove_all() -> None:
    """A process that exits without closing its connections still removes its segments."""
    for pool in list(_POOLS):
        pool.close()


class Mapped:
    """The segments of one peer (the pool prefix it announced in its handshake), mapped
    read-only on first use. ``resolve`` turns a reference into a uint8 array whose
    lifetime says when the segment may go back to the peer (``freed``)."""

    def __init__(self, prefix: str, directory: str = SHM_DIR) -> None:
        if owner_of(prefix + "1") is None:
            raise ShmError(f"shared-memory prefix {prefix!r:.100} is not a psd segment prefix")
        self.prefix = prefix
        self.dir = directory
        self._maps: dict[str, mmap.mmap] = {}
        #: segments whose arrays all died: to be sent back in one ``shm_free``
        self.freed: list[str] = []

    def resolve(self, ref, nbytes: int) -> np.ndarray:
        """The ``nbytes`` bytes a reference frame names, as a read-only uint8 array."""
        ref = memoryview(ref)
        if ref.nbytes > MAX_REF_BYTES:
            raise ShmError(f"shared-memory reference of {ref.nbytes} bytes (at most {MAX_REF_BYTES})")
        try:
            name, offset = msgpack.unpackb(ref, raw=False)
        except Exception:
            raise ShmError("shared-memory reference is not msgpack [name, offset]") from None
        if not isinstance(name, str) or not name.startswith(self.prefix) or "/" in name or owner_of(name) is None:
            raise ShmError(f"segment {name!r:.100} is not one of the sender's (its prefix is {self.prefix!r})")
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise ShmError(f"segment {name}: offset {offset!r:.40} is not a non-negative integer")
        mm = self._maps.get(name) or self._map(name)
        if offset + nbytes > len(mm):
            raise ShmError(f"segment {name}: bytes [{offset}, {offset + nbytes}) are outside its "
                           f"{len(mm)} bytes")
        view = np.frombuffer(mm, np.uint8, nbytes, offset)
        weakref.finalize(view, self._freed_one, name)
        return view

    def _map(self, name: str) -> mmap.mmap:
        try:
            fd = os.open(os.path.join(self.dir, name), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as e:
            raise ShmError(f"segment {name} cannot be opened ({e.strerror})") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
                raise ShmError(f"segment {name} is not a private file of this user (mode 0600)")
            if st.st_size == 0:
                raise ShmError(f"segment {name} is empty")
            mm = mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        if len(self._maps) >= MAX_MAPPED:
            self._maps.pop(next(iter(self._maps)))
        self._maps[name] = mm
        return mm

    def _freed_one(self, name: str) -> None:  # (a finalizer: may run inside any allocation)
        self.freed.append(name)

    def take_freed(self) -> list[str]:
        out, self.freed = self.freed, []
        return out

    def forget_gone(self) -> None:
        """Drop mappings of segments their owner removed (the arrays keep their pages)."""
        for name in [n for n in self._maps if not os.path.exists(os.path.join(self.dir, n))]:
            del self._maps[name]

    def close(self) -> None:
        self._maps.clear()
