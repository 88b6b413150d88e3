"""`edge-coordinator serve`'s HTTP API flags: parsed into the config, validated, announced."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from coordinator.cli import _announce, _serve_config, build_parser, resolve_api_key
from edgecluster.config import CoordinatorConfig, is_loopback_host


def _config(*flags: str) -> CoordinatorConfig:
    args = build_parser().parse_args(["serve", *flags])
    api_key, _ = resolve_api_key(args)
    return _serve_config(args, "cluster-token", api_key)


def test_defaults_are_a_loopback_api_without_a_key() -> None:
    config = _config()
    assert (config.http_host, config.api_key, config.cors_origins) == ("127.0.0.1", None, ())
    assert (config.max_body_bytes, config.max_queue, config.request_timeout_s) == (
        2 << 20,
        64,
        600.0,
    )


def test_flags_reach_the_config() -> None:
    config = _config(
        "--host", "0.0.0.0", "--http-host", "127.0.0.1", "--api-key", "k3y",
        "--cors-origins", "http://localhost:3000, https://ui.example", "--max-body", "64KiB",
        "--max-queue", "5", "--request-timeout", "30",
    )  # fmt: skip
    assert (config.host, config.http_host, config.api_key) == ("0.0.0.0", "127.0.0.1", "k3y")
    assert config.cors_origins == ("http://localhost:3000", "https://ui.example")
    assert (config.max_body_bytes, config.max_queue, config.request_timeout_s) == (
        64 << 10,
        5,
        30.0,
    )


def test_api_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_API_KEY", "from-env")
    assert _config().api_key == "from-env"
    assert _config("--api-key", "flag-wins").api_key == "flag-wins"


def test_an_api_beyond_loopback_gets_a_generated_key() -> None:
    args = build_parser().parse_args(["serve", "--http-host", "0.0.0.0"])
    key, generated = resolve_api_key(args)
    assert generated and key and len(key) >= 24
    given = build_parser().parse_args(["serve", "--http-host", "0.0.0.0", "--api-key", "mine"])
    assert resolve_api_key(given) == ("mine", False)
    local = build_parser().parse_args(["serve", "--http-host", "localhost"])
    assert resolve_api_key(local) == (None, False)


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (("--max-queue", "0"), "--max-queue"),
        (("--request-timeout", "0"), "--request-timeout"),
        (("--max-body", "10"), "--max-body"),
        (("--max-body", "lots"), "--max-body: cannot read size"),
        (("--cors-origins", "localhost:3000"), "--cors-origins"),
        (("--api-key", "two words"), "--api-key"),
        (("--http-host", ""), "--http-host"),
    ],
)
def test_bad_values_name_their_flag(flags: tuple[str, ...], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        _config(*flags)


def test_loopback_hosts() -> None:
    assert all(is_loopback_host(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "localhost"))
    assert not any(is_loopback_host(h) for h in ("0.0.0.0", "::", "192.168.1.5", "my-box"))


def _banner(capsys: pytest.CaptureFixture[str], config: CoordinatorConfig, generated: bool) -> str:
    node = SimpleNamespace(
        config=config, grpc_port=50050, grpc_address="127.0.0.1:50050", serving=None
    )
    _announce(node, "cluster-token", False, generated)
    return capsys.readouterr().out


def test_banner_prints_a_generated_key_only(capsys: pytest.CaptureFixture[str]) -> None:
    generated = CoordinatorConfig(token="t", host="0.0.0.0", http_host="0.0.0.0", api_key="gen-k")
    out = _banner(capsys, generated, True)
    assert "HTTP 0.0.0.0:8000" in out and "generated API key: gen-k" in out
    chosen = CoordinatorConfig(token="t", http_host="0.0.0.0", api_key="secret-k")
    assert "secret-k" not in _banner(capsys, chosen, False)
    grpc_lan = CoordinatorConfig(token="t", host="0.0.0.0")
    assert "--http-host 0.0.0.0" in _banner(capsys, grpc_lan, False)
