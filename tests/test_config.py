"""Config schema validation: one-line errors naming the key."""
import dataclasses
import importlib.util
import pathlib

import pytest

from deediff_jax.config import (ConfigError, LossSpec, base_config, load_config_file, parse_depth_schedule,
                                validate)

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.py")), ids=lambda p: p.stem)
def test_every_shipped_config_validates(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  validate(mod.get_config())


def with_(key, value):
  c = base_config()
  section, name = key.split(".")
  with c.unlocked():
    c[section][name] = value
  return c


@pytest.mark.parametrize("key, value, message", [
    ("exit.policy", "fast", "config key 'exit.policy' is 'fast'; choose one of uem, uem_no_time, static, "
                            "time_schedule, state_cosine, none, adadiff, oracle"),
    ("model.depth", 7, "model.depth: must be even (depth//2 in-blocks + mid + depth//2 out-blocks), got 7; use 8"),
    ("train.batch_size", 0, "config key 'train.batch_size' must be positive, got 0"),
    ("exit.min_layers", 10, "exit.min_layers must be in [1, 9] (the model has 9 blocks), got 10"),
    ("train.ema_rate", 1.0, "train.ema_rate must be in [0, 1), got 1.0"),
    ("train.mode", "frozen_backbone", "train.mode=frozen_backbone needs train.init_from=DIR (a checkpoint "
                                      "workdir or converted U-ViT weights)"),
    ("model.image_size", 16, "model.image_size/in_channels (16, 1) must match data.image_size/channels (8, 1)"),
    ("exit.threshold_schedule", "0.1,x", "config key 'exit.threshold_schedule' must be comma-separated "
                                         "numbers, got '0.1,x'"),
    ("exit.threshold_schedule", "0.1,-0.2", "config key 'exit.threshold_schedule': thresholds must be >= 0 "
                                            "(u is in (0, 1)), got -0.2"),
    ("exit.calibration_buckets", 0, "exit.calibration_buckets must be >= 1 (1 = one threshold), got 0"),
    ("exit.calibration_buckets", 51, "exit.calibration_buckets=51 exceeds sample.steps=50, so some buckets "
                                     "would hold no sampling step; use at most 50"),
    ("loss.time_weighting", "snr", "config key 'loss.time_weighting' is 'snr'; choose one of uniform, min_snr"),
    ("loss.min_snr_gamma", 0.0, "loss.min_snr_gamma must be > 0, got 0.0"),
])
def test_bad_values_give_one_line_errors(key, value, message):
  with pytest.raises(ConfigError) as e:
    validate(with_(key, value))
  assert str(e.value) == message
  assert "\n" not in str(e.value)


def test_unknown_key_is_rejected_with_a_hint():
  c = base_config()
  with c.unlocked():
    c.train.learning_rate = 0.1
  with pytest.raises(ConfigError, match="unknown config key 'train.learning_rate'"):
    validate(c)
  with c.unlocked():
    del c.train["learning_rate"]
    c.model.threshold = 0.1
  with pytest.raises(ConfigError, match=r"unknown config key 'model.threshold' \(did you mean exit.threshold\?\)"):
    validate(c)


def test_depth_schedule_parsing():
  assert parse_depth_schedule("3, 5,9", 9) == [3, 5, 9]
  with pytest.raises(ConfigError, match="depth 12 is outside \\[1, 9\\]"):
    parse_depth_schedule("3,12", 9)
  with pytest.raises(ConfigError, match="must be comma-separated integers"):
    parse_depth_schedule("a,b", 9)


def test_load_config_file_with_overrides(tmp_path):
  cfg = load_config_file(str(ROOT / "configs" / "digits.py"), {"exit.threshold": 0.3, "train.num_steps": 7})
  assert cfg.exit.threshold == 0.3 and cfg.train.num_steps == 7
  with pytest.raises(ConfigError, match="unknown config key 'exit.treshold'"):
    load_config_file(str(ROOT / "configs" / "digits.py"), {"exit.treshold": 0.3})
  with pytest.raises(ConfigError, match="config file 'nope.py' not found"):
    load_config_file("nope.py")


def test_loss_spec_reads_every_loss_key():
  # The jitted training step sees only the LossSpec: a config.loss key it lacks would be ignored.
  c = base_config()
  assert {f.name for f in dataclasses.fields(LossSpec)} == set(c.loss.keys())
  c.loss.time_weighting, c.loss.min_snr_gamma, c.loss.uem_target = "min_snr", 2.5, "fidelity"
  spec = LossSpec.from_config(c)
  assert (spec.time_weighting, spec.min_snr_gamma, spec.uem_target) == ("min_snr", 2.5, "fidelity")
  assert LossSpec.from_config(base_config()) == LossSpec()   # the dataclass defaults are the schema's
