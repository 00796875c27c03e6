"""One unit file on disk: the safetensors layout, written and read without serialised copies.

Writing goes straight from the tensors' memory (or, for a unit updated in place in the buffer
it was read into, from that buffer as it stands); reading decodes views into one buffer. Direct
IO wants 4 KiB-aligned buffers, offsets and lengths: `aligned_empty` makes them (2 MiB-aligned
with transparent huge pages from 2 MiB up), `AlignedWriter` gathers other writes through a
bounce buffer. The checksum is ISA-L's crc32 where it installs, zlib's otherwise. Every file
is created by `safefiles.open_new`, which never writes through what stands at the name.
"""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:  # ISA-L's crc32: the same checksum as zlib's, about 5x faster (35 vs 7 GB/s here)
    from isal.isal_zlib import crc32
except ImportError:  # no wheel for this platform
    from zlib import crc32

from blocktune.errors import ChecksumError, StoreError
from blocktune.machine.devices import dtype_name
from blocktune.machine.hostmem import advise_huge
from blocktune.store.safefiles import open_new

__all__ = ["ALIGN", "HUGE_PAGE", "STREAM_AHEAD", "AlignedWriter", "RowPieces", "write_stream", "aligned_empty", "crc32", "decode_tensors", "StreamedTensors",
           "file_image", "open_direct", "open_new_direct", "read_header",
           "read_into", "round_up", "write_image", "write_tensors"]

_ST_DTYPES = {
    "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
    "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "F64": torch.float64,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}

ALIGN = 4096  # direct IO: buffer addresses, file offsets and lengths in multiples of this
HUGE_PAGE = 2 << 20
_BOUNCE = 16 << 20
_local = threading.local()


def aligned_empty(nbytes: int) -> torch.Tensor:
    """An uninitialised byte buffer whose first byte is ALIGN-aligned.

    From 2 MiB up, the buffer starts on a 2 MiB boundary and asks for transparent huge pages
    (Linux): direct IO then pins and maps a few 2 MiB pages instead of thousands of 4 KiB
    ones. Measured on a 2-core VM, a 103 MB O_DIRECT read took 0.5 instead of 4 ms of CPU and
    19 instead of 60 ms; a first touch faults once per 2 MiB.
    """
    if nbytes < HUGE_PAGE:
        raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8)
        start = -raw.data_ptr() % ALIGN
        return raw[start:start + nbytes]
    span = nbytes + (-nbytes % HUGE_PAGE)
    raw = torch.empty(span + HUGE_PAGE, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE
    advise_huge(raw[start:start + span])
    return raw[start:start + nbytes]


def round_up(n: int) -> int:
    return n + (-n % ALIGN)


def open_direct(path: str, flags: int) -> int:
    """An `opener` for reading with direct IO."""
    return os.open(path, flags | os.O_DIRECT, 0o644)


def open_new_direct(path: str | Path, flags: int = 0) -> int:
    """`open_new` for writing with direct IO."""
    return open_new(path, os.O_DIRECT)


class AlignedWriter:
    """Stands in for the file in `write_tensors` when the file was opened with O_DIRECT:
    bytes are gathered in an aligned bounce buffer (one per thread, reused) and written in
    whole blocks; `finish` pads the last block and truncates the file to its true size.

    With `behind`, the writes go to the disk on a thread, in order, while the caller goes on
    (a step's arithmetic, a checksum): the bounce buffer's two halves take turns, and bytes
    that lie in memory as they will in the file (their address and the file position agree
    modulo a block: a state piece read with direct IO and stepped in place is written back at
    the offset it was read from) are written from where they lie, without a copy, the block
    they start in completed through the bounce buffer. Up to `depth` bytes wait or are being
    written at once, so the caller's bursts (a piece of each moment, 32 MiB) do not wait on
    the disk. Such bytes are the writer's until `settle`: the caller does not change them.
    `settle` must follow, whatever happened: it waits for what is in flight, so that nothing
    is written after the file is closed. A failed write is raised by the caller's next call."""

    def __init__(self, f, behind: bool = False, depth: int = 48 << 20):
        buf = getattr(_local, "bounce", None)
        if buf is None:
            buf = _local.bounce = aligned_empty(_BOUNCE)
        mv = memoryview(buf.numpy())
        self.f, self.fill, self.pos, self.depth = f, 0, 0, depth
        self.uncopied = 0  # bytes written from where the caller's lay
        self._halves = (mv[:len(mv) // 2], mv[len(mv) // 2:]) if behind else (mv,)
        self._half = 0  # the half being filled
        self.mv = self._halves[0]
        self._sent = 0  # bytes of it queued already (before bytes written from where they lie)
        self._cv = threading.Condition()
        self._queue: deque[tuple[memoryview, int | None]] = deque()  # (bytes, the half they are or None)
        self._queued = 0  # bytes waiting or being written
        self._busy = [0, 0]  # writes waiting or under way from each half
        self._running = False  # a drain of the queue is under way
        self._error: BaseException | None = None

    def write(self, data) -> None:
        data = memoryview(data).cast("B")
        if len(self._halves) == 2 and len(data) >= 2 * ALIGN and (_address(data) - self.pos) % ALIGN == 0:
            head = -self.pos % ALIGN
            self._copy(data[:head])  # the block the bytes start in, completed
            if self.fill > self._sent:  # what the bounce buffer holds goes first
                self._submit(self.mv[self._sent:self.fill], self._half)
                self._sent = self.fill
            body = (len(data) - head) // ALIGN * ALIGN
            self._submit(data[head:head + body], None)
            self.pos += body
            self.uncopied += body
            data = data[head + body:]
        self._copy(data)

    def _copy(self, data: memoryview) -> None:
        while len(data):
            n = min(len(data), len(self.mv) - self.fill)
            self.mv[self.fill:self.fill + n] = data[:n]
            self.fill += n
            self.pos += n
            data = data[n:]
            if self.fill == len(self.mv):
                if len(self._halves) == 1:
                    self._drain(self.fill)
                    continue
                self._submit(self.mv[self._sent:], self._half)
                self._next_half()

    def _next_half(self) -> None:
        """Fill the other half, once what it held is on the disk."""
        self._half ^= 1
        self.mv, self.fill, self._sent = self._halves[self._half], 0, 0
        with self._cv:
            while self._busy[self._half] and self._error is None:
                self._cv.wait()
            if self._error is not None:
                raise self._error

    def _submit(self, out: memoryview, half: int | None) -> None:
        with self._cv:
            while self._error is None and self._queued and self._queued + len(out) > self.depth:
                self._cv.wait()
            if self._error is not None:
                raise self._error
            self._queue.append((out, half))
            self._queued += len(out)
            if half is not None:
                self._busy[half] += 1
            if not self._running:
                self._running = True
                _drainer().submit(self._write_queue)

    def _write_queue(self) -> None:
        """On a drain thread: write what is queued, in order, until nothing is (or one fails)."""
        while True:
            with self._cv:
                if not self._queue:
                    self._running = False
                    self._cv.notify_all()
                    return
                out, half = self._queue[0]
            try:
                _write_all(self.f, out)
            except BaseException as exc:
                with self._cv:
                    self._error, self._running = exc, False
                    self._queue.clear()
                    self._queued = 0
                    self._busy = [0, 0]
                    self._cv.notify_all()
                return
            with self._cv:
                self._queue.popleft()
                self._queued -= len(out)
                if half is not None:
                    self._busy[half] -= 1
                self._cv.notify_all()
            del out

    def _drain(self, n: int) -> None:
        self.settle(raising=True)
        _write_all(self.f, self.mv[self._sent:n])
        self.fill = self._sent = 0

    def settle(self, raising: bool = False) -> None:
        """Wait for the writes in flight (`behind`); their error is raised where `raising`."""
        with self._cv:
            while self._running:
                self._cv.wait()
            if self._error is not None and raising:
                raise self._error

    def finish(self, size: int) -> None:
        pad = -self.fill % ALIGN
        self.mv[self.fill:self.fill + pad] = bytes(pad)
        self._drain(self.fill + pad)
        self.f.truncate(size)


def _address(mv: memoryview) -> int:
    """Where a byte memoryview's first byte lies in memory."""
    return np.frombuffer(mv, dtype=np.uint8).ctypes.data


def _write_all(f, out: memoryview) -> None:
    while len(out):
        out = out[f.write(out):]


@functools.cache
def _drainer() -> ThreadPoolExecutor:
    """The threads that write `AlignedWriter`s' queues behind them (one drain at a time per
    writer: the write-back's state file and its masters' unit file, side by side)."""
    return ThreadPoolExecutor(2, thread_name_prefix="blocktune-drain")


class RowPieces:
    """A tensor given as pieces to join along dim 0 (a Meta shard's slices of wq, w1, …).
    Joined along dim 0, contiguous pieces are just their bytes one after another, so
    `write_tensors` writes them in turn and the joined tensor never exists in memory."""

    def __init__(self, pieces: list[torch.Tensor]):
        self.pieces = [p.detach().to("cpu").contiguous() for p in pieces]
        first = self.pieces[0]
        if any(p.dtype != first.dtype or p.shape[1:] != first.shape[1:] for p in self.pieces):
            raise StoreError(f"pieces to join along dim 0 differ: {[tuple(p.shape) for p in self.pieces]}")
        self.dtype = first.dtype
        self.shape = torch.Size([sum(p.shape[0] for p in self.pieces), *first.shape[1:]])

    def numel(self) -> int:
        return self.shape.numel()

    def element_size(self) -> int:
        return self.dtype.itemsize

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def to(self, dtype: torch.dtype) -> RowPieces:
        return self if dtype == self.dtype else RowPieces([p.to(dtype) for p in self.pieces])


def _layout(tensors: dict) -> dict[str, dict[str, Any]]:
    """The manifest's record of a file's tensors."""
    return {k: {"dtype": dtype_name(v.dtype) if v.is_floating_point() else str(v.dtype),
                "shape": list(v.shape)} for k, v in tensors.items()}


def _header(tensors: dict) -> tuple[bytes, list[str], int]:
    """(the file's header bytes, the keys in file order, bytes of tensor data)."""
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    head, size = _spec_header([(k, tensors[k].dtype, tuple(tensors[k].shape)) for k in order])
    return head, order, size


def _spec_header(spec: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> tuple[bytes, int]:
    """Header bytes of a file holding `spec`'s tensors in that order, and bytes of their data."""
    header: dict[str, Any] = {}
    offset = 0
    for k, dtype, shape in spec:
        n = math.prod(shape) * dtype.itemsize
        header[k] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % 8)  # data starts 8-byte aligned
    return struct.pack("<Q", len(blob)) + blob, offset


def file_image(tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The bytes of the file `write_tensors` would write, if they already lie in one buffer: a
    unit read into an aligned buffer and updated in place (AdamW) is its own next version, so
    direct IO can write it from there, without a copy. The tensors must sit at exactly their
    file offsets, after the exact header bytes; the block-rounded tail must be in the buffer.
    None otherwise."""
    values = list(tensors.values())
    if not values or any(not isinstance(t, torch.Tensor) or t.device.type != "cpu" or not t.is_contiguous()
                         for t in values):
        return None
    storage = values[0].untyped_storage()
    if any(t.untyped_storage().data_ptr() != storage.data_ptr() for t in values):
        return None
    head, order, size = _header(tensors)
    start = tensors[order[0]].data_ptr() - len(head)
    offset = len(head)
    for k in order:
        t = tensors[k]
        if t.numel() and t.data_ptr() != start + offset:
            return None
        offset += t.numel() * t.element_size()
    first = start - storage.data_ptr()
    if start % ALIGN or first < 0 or first + round_up(len(head) + size) > storage.nbytes():
        return None
    image = torch.empty(0, dtype=torch.uint8).set_(storage, first, (round_up(len(head) + size),))
    if bytes(image[:len(head)].numpy()) != head:
        return None
    return image[:len(head) + size]


def write_tensors(f, tensors: dict[str, torch.Tensor | RowPieces]) -> tuple[int, int, dict[str, dict[str, Any]]]:
    """Write a safetensors file straight from the tensors' memory (no serialised copy).

    Returns (bytes written, crc32, layout). Tensors are laid out largest dtype first, so
    every tensor's data stays aligned to its element size, as the safetensors library does.
    """
    cpu = {k: v if isinstance(v, RowPieces) else v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    head, order, offset = _header(cpu)
    f.write(head)
    crc = crc32(head)
    for k in order:
        for part in cpu[k].pieces if isinstance(cpu[k], RowPieces) else [cpu[k]]:
            if part.numel():
                mv = memoryview(part.reshape(-1).view(torch.uint8).numpy())
                f.write(mv)
                crc = crc32(mv, crc)
    return len(head) + offset, crc, _layout(cpu)


def write_stream(f, spec: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 data: Iterable[torch.Tensor]) -> tuple[int, int, dict[str, dict[str, Any]]]:
    """Write a safetensors file whose tensors are `spec` (key, dtype, shape), in that order,
    from `data`: pieces, made as they are needed, whose bytes one after another are the
    tensors' (one piece per tensor, or several). Nothing but the piece at hand is held.
    Returns what `write_tensors` does; a piece count or size that is not the spec's is an error."""
    head, size = _spec_header(spec)
    f.write(head)
    crc, done = crc32(head), 0
    for piece in data:
        piece = piece.detach().to("cpu", copy=False).contiguous()
        if piece.numel():
            mv = memoryview(piece.reshape(-1).view(torch.uint8).numpy())
            f.write(mv)
            crc = crc32(mv, crc)
            done += len(mv)
    if done != size:
        raise StoreError(f"the pieces hold {done} bytes for {size} bytes of tensors")
    layout = {k: {"dtype": dtype_name(d) if d.is_floating_point else str(d), "shape": list(shape)}
              for k, d, shape in spec}
    return len(head) + size, crc, layout


def write_image(f, image: torch.Tensor, tensors: dict[str, torch.Tensor]) -> tuple[int, int, dict[str, dict[str, Any]]]:
    """Write a `file_image` with direct IO: whole blocks from the buffer itself (its tail
    rounded up to a block, then cut back by truncate). Returns what `write_tensors` does."""
    nbytes = image.numel()
    whole = torch.empty(0, dtype=torch.uint8).set_(image.untyped_storage(), image.storage_offset(),
                                                   (round_up(nbytes),))
    out = memoryview(whole.numpy())
    while len(out):
        out = out[f.write(out):]
    f.truncate(nbytes)
    return nbytes, crc32(memoryview(image.numpy())), _layout(tensors)


def read_into(f, view: memoryview) -> int:
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def decode_tensors(buf: torch.Tensor, source: str) -> dict[str, torch.Tensor]:
    """Views into a uint8 buffer holding a safetensors file (no copy where aligned)."""
    raw = buf.numpy()
    try:
        (header_len,) = struct.unpack("<Q", raw[:8].tobytes())
        if header_len > len(raw) - 8:
            raise ValueError(f"header length {header_len} exceeds file size {len(raw)}")
        header = json.loads(raw[8:8 + header_len].tobytes())
        start = 8 + header_len
        out = {}
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            dtype = _ST_DTYPES[meta["dtype"]]
            lo, hi = meta["data_offsets"]
            view = buf[start + lo:start + hi]
            if (start + lo) % dtype.itemsize:
                view = view.clone()  # unaligned: copy once rather than fail
            out[key] = view.view(dtype).view(meta["shape"])
        return out
    except (ValueError, KeyError, TypeError, RuntimeError, struct.error) as exc:
        raise StoreError(f"{source}: not a readable safetensors file ({exc})") from exc


_MAX_HEADER = 100 << 20  # the safetensors library's own limit
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
             "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def read_header(path: str | Path) -> dict[str, Any]:
    """The header of a safetensors file someone else wrote (a Hugging Face checkpoint), checked
    against the file before anything is allocated for it: the header length within the file
    (and 100 MB), each tensor's offsets within the data and as long as its dtype and shape
    say. A StoreError that names the file otherwise (the library's errors do not)."""
    path = Path(path)

    def bad(why: str) -> StoreError:
        return StoreError(f"{path}: not a valid safetensors file ({why}); copy it again from where the "
                          "model was downloaded")

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise bad(f"{size} bytes, shorter than the header's length field")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(size - 8, _MAX_HEADER):
            raise bad(f"its header says it is {n:,} bytes long; the file holds {size:,}")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as exc:
            raise bad(f"the header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    data = size - 8 - n
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            lo, hi = (int(v) for v in meta["data_offsets"])
            count = math.prod(int(d) for d in meta["shape"])
            if min(int(d) for d in [0, *meta["shape"]]) < 0:
                raise ValueError("a negative dimension")
        except (KeyError, TypeError, ValueError) as exc:
            raise bad(f"tensor {key!r} has no valid shape and offsets ({exc})") from None
        want = count * _ITEMSIZE.get(meta.get("dtype"), 0)
        if not 0 <= lo <= hi <= data or (want and hi - lo != want):
            raise bad(f"tensor {key!r} ({meta.get('dtype')} {meta['shape']}) at bytes {lo:,}-{hi:,} of "
                      f"{data:,} bytes of data")
    return header


STREAM_AHEAD = 64 << 20  # bytes a `StreamedTensors` reads ahead of its consumer


class StreamedTensors(Mapping):
    """A safetensors file's tensors, each read once, in the order they will be taken: a thread
    reads each one with direct IO (where the file system allows) into memory of its own, at
    most `ahead` bytes before the one the consumer takes, while the consumer works on those
    before it. Nothing goes through the page cache: a mapped file read in order runs at what
    the page cache gives (1.7-2.0 GB/s here), direct reads at the disk's (7.6-8.0 GB/s).

    A tensor taken is the consumer's own (it may write it); the last one taken can be taken
    again, an earlier one cannot (a KeyError that says so). With `check` (in file order only),
    the crc32 of the whole file is compared with `crc` when the last tensor has been read, and
    a mismatch or a short file is raised to the consumer (a ChecksumError naming the file)
    instead of that tensor. `close` stops the thread and closes the file.

    `alloc(nbytes)` gives the memory each read goes into (4 KiB-aligned bytes; by default
    `aligned_empty`'s, fresh): a pool that hands back buffers no tensor views any more saves
    the kernel zeroing every page of a fresh one as the direct read pins it."""

    def __init__(self, path: str | Path, nbytes: int, crc: int, order: list[str] | None = None,
                 check: bool = False, ahead: int = STREAM_AHEAD, alloc: Callable[[int], torch.Tensor] | None = None):
        self.path, self._nbytes, self._crc, self._ahead = Path(path), nbytes, crc, ahead
        self._alloc = alloc or aligned_empty
        try:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self._fd = os.open(self.path, os.O_RDONLY)  # no direct IO here: through the page cache
        try:
            head = self._head()
        except BaseException:
            os.close(self._fd)
            raise
        self._start, self._meta = head
        file_order = sorted(self._meta, key=lambda k: self._meta[k][2])
        self._order = file_order if order is None else [k for k in order if k in self._meta]
        if check and self._order != file_order:
            os.close(self._fd)
            raise ValueError("a streamed file's checksum is computed in file order only")
        self._check = check
        self._ready: dict[str, torch.Tensor] = {}
        self._queued = 0  # bytes read and not yet taken
        self._wanted: str | None = None  # a tensor the consumer waits for: read it past `ahead`
        self._taken: set[str] = set()
        self._last: tuple[str, torch.Tensor] | None = None
        self._error: BaseException | None = None
        self._closed = False
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="blocktune-stream", daemon=True)
        self._thread.start()

    def _head(self) -> tuple[int, dict[str, tuple[torch.dtype, list[int], int, int]]]:
        """(where the data starts, key -> (dtype, shape, first byte, end) in the data)."""
        first = self._pread(0, min(round_up(max(self._nbytes, 8)), 1 << 16))
        if len(first) < 8:
            raise StoreError(f"{self.path}: not a readable safetensors file (shorter than its header)")
        (n,) = struct.unpack("<Q", bytes(first[:8].numpy()))
        if n > min(self._nbytes - 8, _MAX_HEADER):
            raise StoreError(f"{self.path}: not a readable safetensors file (header length {n})")
        raw = first if 8 + n <= len(first) else self._pread(0, round_up(8 + n))
        self._headbytes = raw[:8 + n].clone()
        try:
            header = json.loads(bytes(raw[8:8 + n].numpy()))
            meta = {k: (_ST_DTYPES[m["dtype"]], list(m["shape"]), *m["data_offsets"])
                    for k, m in header.items() if k != "__metadata__"}
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"{self.path}: not a readable safetensors file ({exc})") from exc
        return 8 + n, meta

    def _pread(self, offset: int, nbytes: int) -> torch.Tensor:
        """Bytes [offset, offset + nbytes) of the file (offset and nbytes whole blocks), fewer
        at its end, in an aligned buffer of their own (`alloc`'s): huge pages from 2 MiB up
        (`aligned_empty`). Where the heap maps every big buffer fresh (`LeanHeap` without a slack),
        4 KiB pages cost a fault each: 12 state files of 227 MB streamed at 1.0-1.3 GB/s that
        way, 2.8-3.6 with huge pages."""
        buf = self._alloc(nbytes)
        view, got = memoryview(buf.numpy()), 0
        while got < nbytes:
            n = os.preadv(self._fd, [view[got:]], offset + got)
            if not n:
                break
            got += n
        return buf[:got]

    def _run(self) -> None:
        try:
            crc, pos = (crc32(memoryview(self._headbytes.numpy())), self._start) if self._check else (0, 0)
            for key in self._order:
                dtype, shape, lo, hi = self._meta[key]
                with self._cv:
                    while not self._closed and self._queued and self._queued + hi - lo > self._ahead and (
                            self._wanted is None or self._wanted in self._ready):
                        self._cv.wait()
                    if self._closed:
                        return
                a, b = self._start + lo, self._start + hi
                from_ = min(a, pos) if self._check else a  # checked: every byte, gaps included
                first = from_ - from_ % ALIGN
                raw = self._pread(first, round_up(b) - first)
                if len(raw) < b - first:
                    raise ChecksumError(f"{self.path}: shorter than its header says ({first + len(raw)} bytes, "
                                        f"{key} ends at {b}); the file is damaged")
                data = raw[a - first:b - first]
                if self._check:
                    crc = crc32(memoryview(raw[from_ - first:b - first].numpy()), crc)
                    pos = b
                    if key == self._order[-1] and (pos != self._nbytes or crc != self._crc):
                        raise ChecksumError(f"{self.path}: checksum mismatch (crc32 {crc:08x} over {pos} bytes, "
                                            f"manifest says {self._crc:08x} over {self._nbytes}); the file is damaged")
                if (a - first) % dtype.itemsize:
                    data = data.clone()
                tensor = data.view(dtype).view(shape)
                with self._cv:
                    self._ready[key] = tensor
                    self._queued += hi - lo
                    self._cv.notify_all()
        except BaseException as exc:  # the consumer's next take raises it
            with self._cv:
                self._error = exc
                self._cv.notify_all()

    def __getitem__(self, key: str) -> torch.Tensor:
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        if key not in self._meta:
            raise KeyError(key)
        if key in self._taken:
            raise KeyError(f"{key}: already taken from {self.path}, which is read once, in order")
        with self._cv:
            self._wanted = key
            self._cv.notify_all()
            while key not in self._ready and self._error is None and self._thread.is_alive():
                self._cv.wait(1.0)
            if key not in self._ready:
                raise self._error or StoreError(f"{self.path}: stopped before {key} was read")
            tensor = self._ready.pop(key)
            self._queued -= tensor.numel() * tensor.element_size()
            self._wanted = None
            self._cv.notify_all()
        self._taken.add(key)
        self._last = (key, tensor)
        return tensor

    def __contains__(self, key) -> bool:
        return key in self._meta

    def __iter__(self) -> Iterator[str]:
        return iter(self._meta)

    def __len__(self) -> int:
        return len(self._meta)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join()
        self._ready.clear()
        self._last = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
