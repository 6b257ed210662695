"""TensorBoard scalar event files, written directly: TFRecord framing around `Event` protos.

Why not tensorboardX: importing it imports PyTorch whenever PyTorch is installed (about 4 s on
a 2-core CPU, paid by every training process), and scalars are all training logs. The format:
  record = len:uint64 | masked_crc32c(len):uint32 | data | masked_crc32c(data):uint32
  Event  = wall_time:double (1) | step:int64 (2) | file_version:string (3) | summary:Summary (5)
           | session_log:SessionLog (7)
  Summary.Value = tag:string (1) | simple_value:float (2);  SessionLog = status:enum (1), START = 1
"""
from __future__ import annotations

import os
import socket
import struct
import time

from etils import epath

def _crc_table_entry(n: int) -> int:
  for _ in range(8):
    n = (n >> 1) ^ 0x82F63B78 if n & 1 else n >> 1  # CRC-32C (Castagnoli), reflected
  return n


_CRC_TABLE = [_crc_table_entry(n) for n in range(256)]


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  n &= (1 << 64) - 1  # int64 fields: negatives as two's complement, like protobuf
  out = bytearray()
  while True:
    low, n = n & 0x7F, n >> 7
    out.append(low | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
  return _varint((number << 3) | wire_type) + payload


def _bytes_field(number: int, data: bytes) -> bytes:
  return _field(number, 2, _varint(len(data)) + data)


def event_bytes(step: int, wall_time: float, *, scalars: dict | None = None,
                file_version: str | None = None, session_start: bool = False) -> bytes:
  """One serialized `Event`: a file-version header, a session START or scalar values at `step`."""
  out = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(int(step)))
  if file_version is not None:
    out += _bytes_field(3, file_version.encode())
  if session_start:
    out += _bytes_field(7, _field(1, 0, _varint(1)))
  if scalars:
    values = b"".join(_bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5, struct.pack("<f", value)))
                      for tag, value in scalars.items())
    out += _bytes_field(5, values)
  return out


def record_bytes(data: bytes) -> bytes:
  header = struct.pack("<Q", len(data))
  return (header + struct.pack("<I", _masked(crc32c(header))) + data
          + struct.pack("<I", _masked(crc32c(data))))


class ScalarWriter:
  """add_scalars(step, {tag: value}) into a new logdir/events.out.tfevents.<time>.<host>.<pid>.

  purge_step: on resume, a session START at this step tells TensorBoard to drop what earlier
  files logged from this step on (the steps a killed run logged after its last checkpoint)."""

  def __init__(self, logdir: str, purge_step: int | None = None):
    logdir = epath.Path(logdir)  # a local folder or an object-store URL (written when closed)
    logdir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    self.path = logdir / f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}"
    self._file = self.path.open("wb")
    self._file.write(record_bytes(event_bytes(0, now, file_version="brain.Event:2")))
    if purge_step is not None:
      self._file.write(record_bytes(event_bytes(purge_step, now, session_start=True)))
    self._file.flush()

  def add_scalars(self, step: int, scalars: dict) -> None:
    clean = {tag: float(v) for tag, v in scalars.items()}
    self._file.write(record_bytes(event_bytes(step, time.time(), scalars=clean)))
    self._file.flush()

  def close(self) -> None:
    if not self._file.closed:
      self._file.close()
