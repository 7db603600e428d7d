"""The mock provider's configuration, token count and command line: no server is started."""

from __future__ import annotations

import argparse

import pytest

from batchroute.devtools.mock_provider import MockProviderConfig, count_tokens, register_cli
from batchroute.errors import ConfigError


@pytest.mark.parametrize(("text", "tokens"), [("", 0), ("a", 1), ("abcd", 1), ("abcde", 2),
                                              ("x" * 401, 101)])
def test_count_tokens_is_a_quarter_of_the_characters_rounded_up(text: str, tokens: int) -> None:
    assert count_tokens(text) == tokens


def test_model_limits_are_validated_and_keep_the_config_hashable() -> None:
    config = MockProviderConfig(model_limits={"m": (600, 100_000)})
    assert config.model_limits == {"m": (600, 100_000)}
    assert config.limits_for("m") == (600, 100_000)
    assert config.limits_for("other") == (None, None)
    assert hash(config) == hash(MockProviderConfig(model_limits={"m": (600, 100_000)}))
    with pytest.raises(TypeError):
        config.model_limits["m"] = (1, 1)  # type: ignore[index]
    with pytest.raises(ConfigError, match="model_limits"):
        MockProviderConfig(model_limits={"m": (-1, None)})
    with pytest.raises(ConfigError, match="model_limits"):
        MockProviderConfig(model_limits={"m": 600})  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match="window_s"):
        MockProviderConfig(window_s=0)
    with pytest.raises(ConfigError, match="window_s"):
        MockProviderConfig(window_s=61)


def test_fault_rates_must_be_probabilities_that_sum_to_at_most_one() -> None:
    with pytest.raises(ConfigError, match="fail_rate"):
        MockProviderConfig(fail_rate=1.5)
    with pytest.raises(ConfigError, match="sum"):
        MockProviderConfig(fail_rate=0.6, drop_rate=0.6)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "example.com", "localhost", "::"])
def test_non_loopback_host_is_refused(host: str) -> None:
    with pytest.raises(ConfigError, match="loopback"):
        MockProviderConfig(host=host)


def test_cli_flags_parse_and_bad_values_are_refused() -> None:
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers())
    args = parser.parse_args(["mock-provider"])
    assert (args.port, args.rpm, args.tpm, args.latency_ms, args.hang_s, args.seed) == (
        8765, None, None, 0.0, 30.0, 0)
    with pytest.raises(SystemExit):
        parser.parse_args(["mock-provider", "--fail-rate", "2"])
    assert (args.model_limits, args.window_s) == ([], 60.0)
    args = parser.parse_args(["mock-provider", "--model-limit", "gpt-4-1106-preview=2400",
                              "--model-limit", "ft:gpt-4o:org::x=600:100000",
                              "--window-s", "1"])
    assert args.model_limits == [("gpt-4-1106-preview", 2400, None),
                                 ("ft:gpt-4o:org::x", 600, 100_000)]
    assert args.window_s == 1.0
    with pytest.raises(SystemExit):
        parser.parse_args(["mock-provider", "--window-s", "0"])
    assert args.route_garbage_rate == 0.0
    args = parser.parse_args(["mock-provider", "--route-garbage-rate", "0.2"])
    assert args.route_garbage_rate == 0.2
    with pytest.raises(SystemExit):
        parser.parse_args(["mock-provider", "--route-garbage-rate", "1.5"])
    with pytest.raises(ConfigError, match="route_garbage_rate"):
        MockProviderConfig(route_garbage_rate=-0.1)


def test_start_up_line_keeps_its_default_format() -> None:
    from batchroute.devtools.mock_provider import _describe

    assert _describe(MockProviderConfig(rpm=100, latency_ms=1), 80) == (
        "mock provider listening on http://127.0.0.1:80 (rpm=100, tpm=unlimited, latency=1ms)")
