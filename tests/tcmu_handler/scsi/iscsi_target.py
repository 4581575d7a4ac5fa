"""A minimal iSCSI target around ``handle()``, to run libiscsi's iscsi-test-cu without LIO.

It passes CDBs to the emulation the way LIO + TCMU would for a ``user`` backstore:

- the data-in buffer is exactly the Expected Data Transfer Length and starts out full of
  garbage (0xA5), so stale bytes would show;
- ``read_len`` becomes an underflow residual, and nothing else does (TCMU cannot report
  an overflow; write residuals are not reported either);
- REPORT LUNS is answered here, as LIO answers it; persistent reservations and
  RESERVE/RELEASE, which LIO serves from the kernel, are refused as unsupported opcodes.

It speaks just enough iSCSI for libiscsi: login without authentication or digests,
immediate data and R2T, NOP, TEXT (SendTargets), task management (answered "complete")
and logout. One thread per connection; commands on a connection run in order.

    python -m tests.tcmu_handler.scsi.iscsi_target --port 3260 --size 64M --block-size 512
    iscsi-test-cu -d -S iscsi://127.0.0.1:3260/iqn.2024-01.test.targetvirt:lun/0
"""

from __future__ import annotations

import argparse
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tcmu_handler.scsi import Kind, LunState, RamBackend, classify, handle
from tcmu_handler.scsi.backend import BlockBackend

log = logging.getLogger("iscsi_target")

TARGET_NAME = "iqn.2024-01.test.targetvirt:lun"
MAX_RECV = 262144
FIRST_BURST = 65536
MAX_BURST = 262144
REFUSED = frozenset({0x16, 0x17, 0x56, 0x57, 0x5E, 0x5F})  # LIO's in a real stack


@dataclass
class Session:
    lun: LunState
    backend: BlockBackend
    cmdsn: int = 0
    statsn: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed")
        buf += chunk
    return bytes(buf)


def _pad4(data: bytes) -> bytes:
    return data + bytes(-len(data) % 4)


class Connection:
    def __init__(self, sock: socket.socket, lun: LunState, backend: BlockBackend) -> None:
        self.sock = sock
        self.session = Session(lun, backend)
        self.exp_statsn_base = 0
        self.tsih = 0
        self.pending: list[tuple[bytes, bytes]] = []
        self.send_lock = threading.RLock()

    # --- PDU I/O ---------------------------------------------------------------------

    def read_pdu(self) -> tuple[bytes, bytes]:
        if self.pending:
            return self.pending.pop(0)
        bhs = _recv_exact(self.sock, 48)
        ahs_len = bhs[4] * 4
        dsl = int.from_bytes(bhs[5:8], "big")
        if ahs_len:
            _recv_exact(self.sock, ahs_len)
        data = _recv_exact(self.sock, dsl + (-dsl % 4))[:dsl] if dsl else b""
        return bhs, data

    def send(self, bhs: bytearray, data: bytes = b"") -> None:
        bhs[5:8] = len(data).to_bytes(3, "big")
        with self.send_lock:
            self.sock.sendall(bytes(bhs) + _pad4(data))

    def _sn(self, bhs: bytearray, *, status: bool = True) -> None:
        s = self.session
        struct.pack_into(">III", bhs, 24, s.statsn, s.cmdsn + 1, s.cmdsn + 64)
        if status:
            s.statsn += 1

    def _note_cmdsn(self, bhs: bytes) -> None:
        if not bhs[0] & 0x40:  # not immediate
            self.session.cmdsn = struct.unpack_from(">I", bhs, 24)[0]

    # --- login -------------------------------------------------------------------------

    def login(self) -> bool:
        while True:
            bhs, data = self.read_pdu()
            if bhs[0] & 0x3F != 0x03:
                return False
            keys = dict(kv.split("=", 1) for kv in data.decode().split("\0") if "=" in kv)
            if keys.get("SessionType") == "Discovery":
                self.discovery = True
            reply = self._negotiate(keys)
            transit, nsg = bhs[1] & 0x80, bhs[1] & 0x03
            csg = (bhs[1] >> 2) & 0x03
            self.session.cmdsn = struct.unpack_from(">I", bhs, 24)[0] - 1
            if transit and nsg == 3:
                self.tsih = 1
            out = bytearray(48)
            out[0] = 0x23
            out[1] = (bhs[1] & 0x80) | (csg << 2) | nsg
            out[8:14] = bhs[8:14]
            struct.pack_into(">H", out, 14, self.tsih)
            out[16:20] = bhs[16:20]
            self._sn(out)
            self.send(out, reply)
            if transit and nsg == 3:
                return True

    def _negotiate(self, keys: dict[str, str]) -> bytes:
        answers = {
            "AuthMethod": "None",
            "HeaderDigest": "None",
            "DataDigest": "None",
            "InitialR2T": "Yes",
            "ImmediateData": "Yes",
            "MaxBurstLength": str(MAX_BURST),
            "FirstBurstLength": str(FIRST_BURST),
            "MaxRecvDataSegmentLength": str(MAX_RECV),
            "MaxConnections": "1",
            "DataPDUInOrder": "Yes",
            "DataSequenceInOrder": "Yes",
            "ErrorRecoveryLevel": "0",
            "DefaultTime2Wait": "2",
            "DefaultTime2Retain": "0",
            "MaxOutstandingR2T": "1",
            "IFMarker": "No",
            "OFMarker": "No",
        }
        out = [f"{k}={answers[k]}" for k in keys if k in answers]
        if "TargetName" in keys or "SessionType" in keys:
            out.append("TargetPortalGroupTag=1")
        return "".join(s + "\0" for s in out).encode()

    # --- full feature phase ------------------------------------------------------------

    def serve(self) -> None:
        if not self.login():
            return
        while True:
            bhs, data = self.read_pdu()
            opcode = bhs[0] & 0x3F
            handler = self.HANDLERS.get(opcode)
            if handler is None:
                log.warning("unsupported PDU opcode %#x", opcode)
                return
            with self.send_lock:  # StatSN order, against LONG commands answering late
                if not handler(self, bhs, data):
                    return

    def on_nop(self, bhs: bytes, data: bytes) -> bool:
        self._note_cmdsn(bhs)
        if bhs[16:20] == b"\xff\xff\xff\xff":
            return True
        out = bytearray(48)
        out[0], out[1] = 0x20, 0x80
        out[8:16] = bhs[8:16]
        out[16:20] = bhs[16:20]
        out[20:24] = b"\xff\xff\xff\xff"
        self._sn(out)
        self.send(out, data)
        return True

    def on_text(self, bhs: bytes, data: bytes) -> bool:
        self._note_cmdsn(bhs)
        reply = b""
        if b"SendTargets" in data:
            host, port = self.sock.getsockname()[:2]
            reply = f"TargetName={TARGET_NAME}\0TargetAddress={host}:{port},1\0".encode()
        out = bytearray(48)
        out[0], out[1] = 0x24, 0x80
        out[16:20] = bhs[16:20]
        out[20:24] = b"\xff\xff\xff\xff"
        self._sn(out)
        self.send(out, reply)
        return True

    def on_tmf(self, bhs: bytes, data: bytes) -> bool:
        self._note_cmdsn(bhs)
        out = bytearray(48)
        out[0], out[1], out[2] = 0x22, 0x80, 0x00  # function complete
        out[16:20] = bhs[16:20]
        self._sn(out)
        self.send(out)
        return True

    def on_logout(self, bhs: bytes, data: bytes) -> bool:
        self._note_cmdsn(bhs)
        out = bytearray(48)
        out[0], out[1] = 0x26, 0x80
        out[16:20] = bhs[16:20]
        self._sn(out)
        self.send(out)
        return False

    def on_scsi(self, bhs: bytes, data: bytes) -> bool:
        self._note_cmdsn(bhs)
        edtl = struct.unpack_from(">I", bhs, 20)[0]
        cdb = bytes(bhs[32:48])
        data_out = self._collect_data_out(bhs, data, edtl) if bhs[1] & 0x20 else b""
        reading = bool(bhs[1] & 0x40)

        def run() -> None:
            status, sense, data_in, residual = self.execute(cdb, edtl, data_out, reading)
            with self.send_lock:
                self._respond(bhs, status, sense, data_in, residual)

        if classify(cdb) is Kind.LONG:  # as the device loop does: other commands go on
            threading.Thread(target=run, daemon=True).start()
        else:
            run()
        return True

    def _collect_data_out(self, bhs: bytes, immediate: bytes, edtl: int) -> bytes:
        buf = bytearray(immediate)
        r2tsn = 0
        while len(buf) < edtl:
            want = min(MAX_BURST, edtl - len(buf))
            r2t = bytearray(48)
            r2t[0], r2t[1] = 0x31, 0x80
            r2t[8:16] = bhs[8:16]
            r2t[16:20] = bhs[16:20]
            struct.pack_into(">I", r2t, 20, 0x1000 + r2tsn)
            self._sn(r2t, status=False)
            struct.pack_into(">III", r2t, 36, r2tsn, len(buf), want)
            self.send(r2t)
            r2tsn += 1
            got = 0
            while got < want:
                pdu, payload = self.read_pdu()
                if pdu[0] & 0x3F != 0x05:
                    self.pending.append((pdu, payload))  # not ours: keep it for later
                    return bytes(buf)
                buf += payload
                got += len(payload)
                if pdu[1] & 0x80:
                    break
        return bytes(buf[:edtl])

    def execute(
        self, cdb: bytes, edtl: int, data_out: bytes, reading: bool
    ) -> tuple[int, bytes, bytes, int]:
        """What LIO + TCMU would do with this command; returns (status, sense, data, U)."""
        if cdb[0] == 0xA0:
            return self._report_luns(cdb, edtl)
        if cdb[0] in REFUSED:
            sense = bytes((0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x20, 0, 0, 0, 0, 0))
            return 2, sense, b"", 0
        buf = bytearray(b"\xa5" * edtl) if reading else bytearray()
        data_in = [memoryview(buf)] if buf else []
        out = [memoryview(bytearray(data_out))] if data_out else []
        done = handle(self.session.lun, cdb[: _cdb_len(cdb[0])], out, data_in, self.session.backend)
        if done.status != 0:
            return done.status, done.sense, b"", 0
        n = len(buf) if done.read_len is None else min(done.read_len, len(buf))
        return 0, b"", bytes(buf[:n]), len(buf) - n

    def _report_luns(self, cdb: bytes, edtl: int) -> tuple[int, bytes, bytes, int]:
        alloc = struct.unpack_from(">I", cdb, 6)[0]
        data = struct.pack(">I4xQ", 8, 0)[: min(alloc, edtl)]
        return 0, b"", data, edtl - len(data)

    def _respond(self, bhs: bytes, status: int, sense: bytes, data: bytes, residual: int) -> None:
        if status == 0 and data:
            self._send_data_in(bhs, data, residual)
            return
        out = bytearray(48)
        out[0], out[1], out[2], out[3] = 0x21, 0x80 | (0x02 if residual else 0), 0, status
        out[16:20] = bhs[16:20]
        self._sn(out)
        struct.pack_into(">I", out, 44, residual)
        self.send(out, struct.pack(">H", len(sense)) + sense if sense else b"")

    def _send_data_in(self, bhs: bytes, data: bytes, residual: int) -> None:
        """Data-In PDUs; the last carries GOOD status (S bit) and the underflow residual."""
        for datasn, offset in enumerate(range(0, len(data), MAX_RECV)):
            chunk = data[offset : offset + MAX_RECV]
            last = offset + len(chunk) == len(data)
            out = bytearray(48)
            out[0] = 0x25
            out[8:16] = bhs[8:16]
            out[16:20] = bhs[16:20]
            out[20:24] = b"\xff\xff\xff\xff"
            if last:
                out[1] = 0x81 | (0x02 if residual else 0)
                self._sn(out)
                struct.pack_into(">I", out, 44, residual)
            else:
                self._sn(out, status=False)
            struct.pack_into(">II", out, 36, datasn, offset)
            self.send(out, chunk)

    HANDLERS: dict[int, Callable[[Connection, bytes, bytes], bool]] = {
        0x00: on_nop,
        0x01: on_scsi,
        0x02: on_tmf,
        0x04: on_text,
        0x06: on_logout,
    }


def _cdb_len(opcode: int) -> int:
    return (6, 10, 10, 16, 16, 12, 16, 16)[opcode >> 5]


def serve(
    port: int,
    lun: LunState,
    backend: BlockBackend,
    on_ready: Callable[[int], None] | None = None,
) -> None:
    """Accept connections forever; ``on_ready`` gets the bound port (use 0 for any)."""
    srv = socket.create_server(("127.0.0.1", port))
    if on_ready is not None:
        on_ready(srv.getsockname()[1])
    while True:
        sock, _ = srv.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_run, args=(sock, lun, backend), daemon=True).start()


def _run(sock: socket.socket, lun: LunState, backend: BlockBackend) -> None:
    try:
        Connection(sock, lun, backend).serve()
    except (ConnectionError, OSError):
        pass
    finally:
        sock.close()


class SlowBackend(RamBackend):
    """RamBackend whose writes take time, so SANITIZE is still running when a test looks."""

    def __init__(self, size: int, granule: int, delay: float) -> None:
        super().__init__(size, granule)
        self.delay = delay

    def write_from(self, offset: int, bufs: Sequence[memoryview], fua: bool) -> None:
        time.sleep(self.delay * sum(len(b) for b in bufs) / (1 << 20))
        super().write_from(offset, bufs, fua)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        time.sleep(self.delay * length / (1 << 20))
        super().write_zeroes(offset, length, unmap)


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, default=3260)
    p.add_argument("--size", default="64M")
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--granule", default="1M")
    p.add_argument("--read-only", action="store_true")
    p.add_argument("--lbppbe", type=int, default=0, help="logical blocks per physical, log2")
    p.add_argument("--slow", type=float, default=0.0, help="seconds per MiB written")
    args = p.parse_args()
    size, bs = _size(args.size), args.block_size
    lun = LunState.for_vdisk(
        "6f2e7d2c-8a55-4f4c-9b1e-1c2d3e4f5a6b",
        size // bs,
        block_size=bs,
        segment_size=_size(args.granule),
        read_only=args.read_only,
    )
    lun.physical_block_exponent = args.lbppbe
    logging.basicConfig(level=logging.INFO)
    backend = SlowBackend(size, _size(args.granule), args.slow)
    serve(args.port, lun, backend)


if __name__ == "__main__":
    main()
