"""The untrained chest X-ray weights are calibrated once per output folder and then loaded bit for bit."""

from __future__ import annotations

import logging

import pytest
import torch

from neuron_models.xray import build_untrained, untrained_cache_file

pytestmark = pytest.mark.timeout(600)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def test_cached_untrained_weights_are_bit_identical_and_a_corrupt_cache_is_rebuilt(tmp_path, caplog):
    cache = tmp_path / ".cache" / "untrained"
    calibrated = build_untrained(seed=2, cache_dir=cache)  # calibrates and writes the cache
    path = untrained_cache_file(cache, seed=2)
    digest = path.with_name(path.name + ".sha256")
    assert path.is_file() and digest.is_file()
    written = path.stat().st_mtime_ns

    loaded = build_untrained(seed=2, cache_dir=cache)
    assert path.stat().st_mtime_ns == written, "the second build must load the cache, not calibrate again"
    assert_same_weights(calibrated, loaded)
    x = torch.linspace(-1024, 1024, 224 * 224).reshape(1, 1, 224, 224)
    assert torch.equal(calibrated.probabilities(calibrated.forward_head(calibrated.forward_features(x))),
                       loaded.probabilities(loaded.forward_head(loaded.forward_features(x))))

    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # one flipped bit inside a weight: still parses, must not be trusted
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        rebuilt = build_untrained(seed=2, cache_dir=cache)
    assert "does not match its sha256" in caplog.text
    assert_same_weights(calibrated, rebuilt)
    assert path.read_bytes() != bytes(data)  # the cache holds the good weights again


def test_the_cache_key_follows_the_seed(tmp_path):
    assert untrained_cache_file(tmp_path, seed=0) != untrained_cache_file(tmp_path, seed=1)
    assert untrained_cache_file(tmp_path, seed=0).parent == tmp_path
