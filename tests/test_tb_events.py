"""TensorBoard event files (train/tb_events.py), checked against tensorboardX's own protobuf
classes and CRC: the reference reader of the format this module writes without importing it."""
import glob
import struct

import pytest

from deediff_jax.train import tb_events
from deediff_jax.train.metrics import MetricsWriter


def read_records(path):
  """[(Event, header_crc_ok, data_crc_ok)] parsed with tensorboardX's protobuf and masked CRC."""
  from tensorboardX.proto import event_pb2
  from tensorboardX.record_writer import masked_crc32c
  data, i, out = open(path, "rb").read(), 0, []
  while i < len(data):
    header = data[i:i + 8]
    (n,) = struct.unpack("<Q", header)
    (header_crc,) = struct.unpack("<I", data[i + 8:i + 12])
    body = data[i + 12:i + 12 + n]
    (body_crc,) = struct.unpack("<I", data[i + 12 + n:i + 16 + n])
    event = event_pb2.Event()
    event.ParseFromString(body)
    out.append((event, header_crc == masked_crc32c(header), body_crc == masked_crc32c(body)))
    i += 16 + n
  assert i == len(data)
  return out


def test_crc32c_check_value():
  assert tb_events.crc32c(b"123456789") == 0xE3069283  # the CRC-32C catalogue's check value
  assert tb_events.crc32c(b"") == 0


def test_scalars_read_back_with_tensorboardx(tmp_path):
  w = tb_events.ScalarWriter(str(tmp_path), purge_step=11)
  w.add_scalars(10, {"train/loss": 0.5, "train/lr": 1e-3})
  w.add_scalars(2**40, {"train/loss": -3.25})
  w.close()
  (path,) = glob.glob(str(tmp_path / "events.out.tfevents.*"))
  records = read_records(path)
  assert all(ok_h and ok_d for _, ok_h, ok_d in records)
  events = [e for e, _, _ in records]
  assert events[0].file_version == "brain.Event:2"
  assert events[1].step == 11 and events[1].session_log.status == events[1].session_log.START
  assert events[2].step == 10
  assert [(v.tag, v.simple_value) for v in events[2].summary.value] == [
      ("train/loss", 0.5), ("train/lr", pytest.approx(1e-3))]
  assert events[3].step == 2**40 and events[3].summary.value[0].simple_value == -3.25
  assert events[3].wall_time >= events[0].wall_time > 1e9


def test_metrics_writer_purges_from_the_resumed_step(tmp_path):
  w = MetricsWriter(tmp_path, resume_step=20)
  w.write(30, {"loss": 1.5})
  w.close()
  (path,) = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
  events = [e for e, _, _ in read_records(path)]
  assert events[1].step == 21 and events[1].session_log.status == events[1].session_log.START
  assert [(v.tag, v.simple_value) for v in events[2].summary.value] == [("train/loss", 1.5)]
