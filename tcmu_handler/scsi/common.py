"""What every command handler shares: the completion, buffer helpers, and field decoders.

Buffers are the command's iovecs: sequences of 1-D unsigned-byte memoryviews into the
TCMU data area. Data-in buffers may hold stale data from earlier commands, so a handler
either fills them completely or reports how much it filled (``read_len``).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import NamedTuple

from targetvirt.errors import ScsiError, invalid_field_in_cdb, lba_out_of_range

GOOD = 0x00
CHECK_CONDITION = 0x02
CONDITION_MET = 0x04


class Completion(NamedTuple):
    """The result of one command.

    ``status`` is the SAM status byte; ``sense`` is empty or sense data to copy into the
    TCMU entry; ``read_len``, when not None, is how many bytes of the data-in buffers are
    valid (TCMU_UFLAG_READ_LEN): LIO reports the rest as an underflow residual.
    """

    status: int
    sense: bytes
    read_len: int | None


class Kind(enum.Enum):
    """How the device loop should run a command (see :func:`command.classify`)."""

    INLINE = "inline"  # pure emulation: no backend call, microseconds; run it in the loop
    IO = "io"  # calls the backend; run it in a worker thread
    LONG = "long"  # FORMAT UNIT / SANITIZE: minutes over the whole LUN; a worker of its own


COMPLETED = Completion(GOOD, b"", None)
NO_DATA = Completion(GOOD, b"", 0)


def total_length(bufs: Sequence[memoryview]) -> int:
    if len(bufs) == 1:
        return len(bufs[0])
    return sum(len(b) for b in bufs)


def clip(bufs: Sequence[memoryview], length: int) -> list[memoryview]:
    """The first ``length`` bytes of ``bufs`` (which must hold at least that many)."""
    out: list[memoryview] = []
    for buf in bufs:
        if length <= 0:
            break
        out.append(buf[:length] if len(buf) > length else buf)
        length -= len(buf)
    return out


def scatter(data: bytes | bytearray | memoryview, bufs: Sequence[memoryview]) -> int:
    """Copy as much of ``data`` as fits into ``bufs``; return the bytes copied."""
    view = memoryview(data)
    done = 0
    for buf in bufs:
        if done >= len(view):
            break
        n = min(len(buf), len(view) - done)
        buf[:n] = view[done : done + n]
        done += n
    return done


def gather(bufs: Sequence[memoryview], length: int) -> bytes:
    """The first ``length`` bytes of ``bufs`` as one bytes object (for small parameter data)."""
    if len(bufs) == 1:
        return bytes(bufs[0][:length])
    return b"".join(bytes(b) for b in clip(bufs, length))


def respond(data: bytes | bytearray, alloc_len: int, data_in: Sequence[memoryview]) -> Completion:
    """GOOD with ``data`` truncated to the allocation length, reporting exactly what was sent."""
    n = scatter(memoryview(data)[: max(0, alloc_len)], data_in)
    return COMPLETED if n == total_length(data_in) else Completion(GOOD, b"", n)


def check_range(lba: int, blocks: int, num_blocks: int) -> None:
    """LBA OUT OF RANGE unless [lba, lba + blocks) lies inside the LUN.

    Python integers do not wrap, so a 64-bit LBA near 2**64 is caught here too.
    """
    if lba + blocks > num_blocks:
        raise lba_out_of_range(lba, blocks)


def reject_protect(flags: int, byte: int = 1) -> None:
    """RDPROTECT/WRPROTECT/VRPROTECT/ORPROTECT != 0: the LUN has no protection information."""
    if flags & 0xE0:
        raise invalid_field_in_cdb(byte, 7, "protection information is not supported")


def short_cdb() -> ScsiError:
    return invalid_field_in_cdb(0, why="CDB shorter than its operation code requires")
