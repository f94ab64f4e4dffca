"""Config: file < environment < --set, and every bad key/type is a named error."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import config


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "agent.toml"
    p.write_text(text)
    return p


def test_defaults_when_default_file_missing() -> None:
    cfg = config.load(None, environ={})
    assert cfg.quote.source == "configfs"
    assert cfg.serve.compat_socket == "/run/attestation-service/attestation.sock"
    assert cfg.rtmr.enabled is False


def test_file_env_and_flag_precedence(tmp_path: Path) -> None:
    path = write(tmp_path, '[quote]\nsource = "simulated"\nretries = 7\n[serve]\nvalidator_hosts = ["a.example"]\n')
    cfg = config.load(path, environ={})
    assert (cfg.quote.source, cfg.quote.retries, cfg.serve.validator_hosts) == ("simulated", 7, ["a.example"])
    env = {"CHUTES_ATTEST_QUOTE_RETRIES": "9", "CHUTES_ATTEST_SERVE_VALIDATOR_HOSTS": "x.example, y.example"}
    cfg = config.load(path, environ=env)
    assert cfg.quote.retries == 9
    assert cfg.serve.validator_hosts == ["x.example", "y.example"]
    cfg = config.load(path, ["quote.retries=11", "serve.socket_mode=0o600"], environ=env)
    assert cfg.quote.retries == 11
    assert cfg.serve.socket_mode == 0o600


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[quote]\nsorce = 'x'\n", "unknown key quote.sorce"),
        ("[qoute]\nsource = 'x'\n", "unknown section 'qoute'"),
        ("[quote]\nretries = 'three'\n", "quote.retries: expected an integer"),
        ("[rtmr]\nenabled = 1\n", "rtmr.enabled: expected a boolean"),
        ("[quote]\nsource = 'magic'\n", "quote.source: must be one of configfs, simulated"),
        ("[serve]\nvalidator_hosts = 'a'\n", "serve.validator_hosts: expected a list"),
        ("[tpm]\npcrs = [1, 99]\n", "tpm.pcrs: must be PCR indexes 0..23"),
        ("[quote]\nqueue_max = 0\n", "quote.queue_max: must be > 0"),
        ("quote = 3\n", "quote: expected a table"),
        ("[quote\n", "invalid TOML"),
    ],
)
def test_bad_file_names_the_key(tmp_path: Path, text: str, needle: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(config.ConfigError) as exc:
        config.load(path, environ={})
    assert needle in str(exc.value)
    assert str(path) in str(exc.value) or "must be" in str(exc.value)


def test_bad_env_and_flag_name_their_origin(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match=r"environment CHUTES_ATTEST_QUOTE_RETRIES: quote\.retries"):
        config.load(None, environ={"CHUTES_ATTEST_QUOTE_RETRIES": "many"})
    with pytest.raises(config.ConfigError, match=r"unknown key boot\.nope"):
        config.load(None, ["boot.nope=1"], environ={})
    with pytest.raises(config.ConfigError, match=r"expected section\.key=value"):
        config.load(None, ["bootnope"], environ={})


def test_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="config file not found"):
        config.load(tmp_path / "absent.toml", environ={})
