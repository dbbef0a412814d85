"""The engine flags of `moebius generate|serve` map onto EngineConfig; bad values fail with a
clear message instead of a traceback."""

from __future__ import annotations

import argparse

import pytest

from moebius.cli import byte_size, engine_args, engine_config, main, parse_schedule
from moebius.config import ConfigError


def _config(qwen_dir, *flags):
    p = argparse.ArgumentParser()
    engine_args(p)
    return engine_config(p.parse_args(["--device", "cpu", *flags]), qwen_dir)


def test_memory_and_graph_flags_reach_the_config(qwen_dir):
    cfg = _config(qwen_dir, "--gpu-memory-utilization", "0.8", "--kv-cache-memory", "96M",
                  "--enforce-eager", "--switch-schedule", "3:ep, 7:tp")
    assert cfg.gpu_memory_utilization == 0.8
    assert cfg.kv_cache_memory == 96 * 2**20
    assert cfg.enforce_eager
    assert cfg.switch_schedule == ((3, "ep"), (7, "tp"))
    default = _config(qwen_dir)
    assert (default.gpu_memory_utilization, default.kv_cache_memory, default.enforce_eager) == (
        0.9, 0, False)


@pytest.mark.parametrize("text,want", [("4096", 4096), ("512M", 512 << 20), ("20G", 20 << 30),
                                       ("1.5GiB", 3 << 29), ("2gb", 2 << 30), ("64k", 64 << 10)])
def test_byte_sizes(text, want):
    assert byte_size(text) == want


@pytest.mark.parametrize("text", ["lots", "G", "-1G", ""])
def test_bad_byte_sizes(text):
    with pytest.raises(argparse.ArgumentTypeError):
        byte_size(text)


@pytest.mark.parametrize("text", ["5ep", "x:ep", "5:", "5:ep,,7:tp"])
def test_bad_schedules_name_the_item(text):
    with pytest.raises(ValueError, match="STEP:LAYOUT"):
        parse_schedule(text)


def test_bad_utilization_is_a_config_error(qwen_dir):
    with pytest.raises(ConfigError, match="gpu_memory_utilization"):
        _config(qwen_dir, "--gpu-memory-utilization", "1.5")


def test_the_command_line_reports_bad_flags_without_a_traceback(qwen_dir, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", qwen_dir, "--prompt", "hi", "--device", "cpu", "--switch-schedule",
              "5ep"])
    assert "STEP:LAYOUT" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        main(["generate", qwen_dir, "--prompt", "hi", "--kv-cache-memory", "lots"])
    assert e.value.code == 2 and "not a size" in capsys.readouterr().err
