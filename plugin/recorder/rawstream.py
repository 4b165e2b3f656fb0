"""Raw copy: finished ring slots and their step records, from the worker to the reader.

The worker does no more than count and copy. After its batched device-to-host copy, the flusher
appends every finished step (its counts, [layers, 3, experts + 1] int32, and its step record:
tokens, requests, context and KV bytes per phase, kind, duration, collective time, the
scheduler's token count) to a fixed-size ring in a file on tmpfs, `<run dir>/e<engine>-r<rank>.raw`,
mapped into memory. Folding, windows, the predictor and every exporter run in the reader
(`moe_reuse.plugin.reader`), in another process, with its own cursor.

One writer, any number of readers, no lock and no wait on either side:
- the writer first invalidates the stamps of the slots it is about to reuse, writes the payloads,
  stamps each slot with its step's sequence number, then publishes the new write sequence in the
  header;
- a reader copies a range of published records, then checks each copied stamp: a slot the writer
  started to reuse during the copy no longer carries the expected number, and is counted as
  missed, never folded half-written;
- the writer never waits for a reader: a reader a whole ring behind loses the oldest steps and
  says how many (exported in `moe_reuse_dropped_steps_total`).
Between the payload and the stamps both sides pass a lock (`_fence`): a pthread mutex is a full
barrier, so the order holds on weakly ordered CPUs too (Grace's Arm cores), not only on x86-64.
The ring is sized so that a reader polling every 0.1 s is seconds ahead of the writer.

Numpy and the standard library only: the worker's side runs in the flusher thread, the reader's
in the API server or the per-node exporter.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import stat
import threading
from typing import Any

import numpy as np

from .aggregate import COMM_OPS

MAGIC = 0x4D4F45524157_0001  # "MOERAW", format 1
HEADER_BYTES = 4096
_H_MAGIC, _H_LAYERS, _H_COLS, _H_CAP, _H_WRITE, _H_PID = range(6)
RING_BYTES = 32 * 1024 * 1024
"""Payload bytes of one rank's ring: about 170 steps of a 61-layer, 256-expert model (seconds of
decode), thousands of a small one; at least four device rings either way."""
MAX_RECORDS = 65536
META_DTYPE = np.dtype([
    ("kind", np.int64), ("tokens", np.int64, 2), ("requests", np.int64, 2),
    ("context", np.int64, 2), ("kv_bytes", np.float64, 2), ("duration_ns", np.int64),
    ("comm_ns", np.int64, len(COMM_OPS)), ("scheduled", np.int64),
])
META_FIELDS = META_DTYPE.names or ()


_FENCE = threading.Lock()


def _fence() -> None:
    """A memory barrier from Python: an uncontended mutex acquire and release."""
    with _FENCE:
        pass


def status_name(engine: str, rank: str) -> str:
    """The worker's status file (plain data for the reader, rewritten every flush)."""
    return f"w{engine}-r{rank}.npz"


def raw_name(engine: str, rank: str) -> str:
    return f"w{engine}-r{rank}.raw"


def capacity(num_layers: int, columns: int, device_ring_steps: int,
             ring_bytes: int = RING_BYTES) -> int:
    """Records in a rank's ring: what `ring_bytes` holds, at least four device rings."""
    per = num_layers * 3 * columns * 4 + META_DTYPE.itemsize + 8
    return int(min(max(ring_bytes // per, 4 * device_ring_steps, 64), MAX_RECORDS))


def _views(buf: Any, layers: int, cols: int, cap: int) -> tuple[np.ndarray, ...]:
    header = np.frombuffer(buf, dtype=np.int64, count=HEADER_BYTES // 8)
    off = HEADER_BYTES
    counts = np.frombuffer(buf, dtype=np.int32, count=cap * layers * 3 * cols, offset=off)
    off += counts.nbytes
    meta = np.frombuffer(buf, dtype=META_DTYPE, count=cap, offset=off)
    off += meta.nbytes
    stamps = np.frombuffer(buf, dtype=np.int64, count=cap, offset=off)
    return header, counts.reshape(cap, layers, 3, cols), meta, stamps


def file_bytes(layers: int, cols: int, cap: int) -> int:
    return HEADER_BYTES + cap * (layers * 3 * cols * 4 + META_DTYPE.itemsize + 8)


class RawWriter:
    """The worker's end: append finished steps. Created once at bind (fixed size)."""

    def __init__(self, dir_fd: int, name: str, num_layers: int, columns: int, cap: int) -> None:
        size = file_bytes(num_layers, columns, cap)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)  # a previous worker of this rank (same run)
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=dir_fd)
        try:
            os.ftruncate(fd, size)
            self._mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.name, self.cap = name, cap
        self.header, self.counts, self.meta, self.stamps = _views(self._mm, num_layers, columns,
                                                                  cap)
        self.counts[...] = 0  # every page now: memory fixed at bind, no page fault on a step
        self.meta[...] = np.zeros((), dtype=META_DTYPE)
        self.stamps[:] = -1
        self.header[[_H_LAYERS, _H_COLS, _H_CAP, _H_WRITE, _H_PID]] = (
            num_layers, columns, cap, 0, os.getpid())
        self.header[_H_MAGIC] = MAGIC  # last: a reader never maps a half-made header
        self.written = 0

    def nbytes(self) -> int:
        return len(self._mm)

    def append(self, counts: np.ndarray, meta: dict[str, np.ndarray]) -> None:
        """counts: [L, n, 3, C] (the host copy of n finished slots); meta: StepMeta.take()."""
        n = counts.shape[1]
        if n == 0:
            return
        if n > self.cap:  # never with the sizing above; keep the newest
            counts, meta = counts[:, n - self.cap:], {k: v[n - self.cap:] for k, v in meta.items()}
            self.written += n - self.cap
            n = self.cap
        first = self.written % self.cap
        parts = [(first, min(first + n, self.cap), 0)]
        if first + n > self.cap:
            parts.append((0, first + n - self.cap, self.cap - first))
        for a, b, _ in parts:  # slices, not fancy indexing: strided block copies
            self.stamps[a:b] = -1
        _fence()
        for a, b, off in parts:
            self.counts[a:b] = counts[:, off:off + b - a].transpose(1, 0, 2, 3)
            for name in META_FIELDS:
                self.meta[name][a:b] = meta[name][off:off + b - a]
        _fence()
        for a, b, off in parts:
            self.stamps[a:b] = np.arange(self.written + off, self.written + off + b - a)
        _fence()
        self.written += n
        self.header[_H_WRITE] = self.written

    def close(self) -> None:
        _unmap(self)


def _unmap(ring: Any) -> None:
    """Drop the views, then the mapping (a view still held elsewhere keeps it mapped)."""
    for name in ("header", "counts", "meta", "stamps"):
        ring.__dict__.pop(name, None)
    with contextlib.suppress(BufferError):
        ring._mm.close()


class RawReader:
    """A reader's end: map a rank's ring read-only and take what was published since the cursor.

    Raises ValueError for a file that is not a ring of ours (the caller counts it as corrupt).
    """

    def __init__(self, dir_fd: int, name: str) -> None:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dir_fd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                raise ValueError(f"{name}: not a regular file of ours")
            if st.st_size < HEADER_BYTES:
                raise ValueError(f"{name}: {st.st_size} bytes, shorter than a header")
            self._mm = mmap.mmap(fd, st.st_size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        head = np.frombuffer(self._mm, dtype=np.int64, count=8).tolist()
        magic, layers, cols, cap = head[_H_MAGIC], head[_H_LAYERS], head[_H_COLS], head[_H_CAP]
        if magic != MAGIC or min(layers, cols, cap) <= 0 or cap > MAX_RECORDS \
                or file_bytes(layers, cols, cap) != st.st_size:
            self._mm.close()
            raise ValueError(f"{name}: not a raw ring of this format")
        self.name, self.layers, self.columns, self.cap = name, layers, cols, cap
        self.header, self.counts, self.meta, self.stamps = _views(self._mm, layers, cols, cap)
        self.writer_pid = int(head[_H_PID])
        self.cursor = 0

    def written(self) -> int:
        return int(self.header[_H_WRITE])

    def take(self, max_steps: int | None = None
             ) -> tuple[np.ndarray, dict[str, np.ndarray], int]:
        """(counts [L, m, 3, C], step records, steps missed) since the cursor; advances it."""
        w = self.written()
        if w < self.cursor:  # a new writer under the same name: start over with it
            self.cursor = 0
        start = max(self.cursor, w - self.cap)
        missed = start - self.cursor
        stop = w if max_steps is None else min(w, start + max_steps)
        seqs = np.arange(start, stop, dtype=np.int64)
        slots = seqs % self.cap
        _fence()  # the write sequence before the payload
        counts = self.counts[slots]  # copies
        meta = self.meta[slots]
        _fence()  # the payload before the stamps
        ok = self.stamps[slots] == seqs  # after the copy: a slot reused meanwhile fails
        self.cursor = stop
        if not ok.all():
            missed += int((~ok).sum())
            counts, meta = counts[ok], meta[ok]
        return (np.ascontiguousarray(counts.transpose(1, 0, 2, 3)),
                {k: np.ascontiguousarray(meta[k]) for k in META_FIELDS}, missed)

    def close(self) -> None:
        _unmap(self)
