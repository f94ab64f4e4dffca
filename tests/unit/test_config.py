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


# -- every key documented where it is defined and in the generated file (issue 20 item 6) ---------------

def all_keys() -> list[str]:
    """Every configuration key, from the dataclasses themselves (a key added anywhere is in here)."""
    import dataclasses

    return [f"{section}.{f.name}" for section, typ in config._sections().items() for f in dataclasses.fields(typ)]


def test_every_key_is_documented_where_it_is_defined() -> None:
    docs = config.key_docs()
    missing = [key for key in all_keys() if not docs.get(key, "").strip()]
    assert not missing, ("configuration keys without a `#:` comment line above their field in agent/config.py: "
                         + ", ".join(missing))
    assert set(docs) <= set(all_keys())


def test_the_documentation_check_sees_an_undocumented_key() -> None:
    """The same reader on a synthetic source: a field without ``#:`` is missing, a multi-line one is whole."""
    source = ('class LogConfig:\n    """Logs."""\n\n    #: first line\n    #: second line\n    level: str = "info"\n'
              '    # a plain comment is not documentation\n    format: str = "auto"\n')
    docs = config.key_docs(source)
    assert docs == {"log.level": "first line\nsecond line"}
    assert [k for k in ("log.level", "log.format") if k not in docs] == ["log.format"]


def test_generated_conffile_documents_every_key_and_reads_back(tmp_path: Path) -> None:
    import subprocess
    import sys
    import tomllib

    p = subprocess.run([sys.executable, "-m", "agent.cli", "--config", str(write(tmp_path, "")), "config"],
                       capture_output=True, text=True, timeout=60, check=False, env={"PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    docs = config.key_docs()
    section = ""
    undocumented = []
    for i, line in enumerate(lines):
        if line.startswith("["):
            section = line.strip("[]")
        elif line and not line.startswith("#"):
            key = f"{section}.{line.split(' = ', 1)[0]}"
            doc = docs[key].splitlines()
            if lines[i - len(doc):i] != [f"# {d}".rstrip() for d in doc]:
                undocumented.append(key)
    assert not undocumented, "keys printed without their documentation: " + ", ".join(undocumented)
    printed = {f"{s}.{k}" for s, table in tomllib.loads(p.stdout).items() for k in table}
    assert printed == set(all_keys())
    kept = write(tmp_path, p.stdout)  # the output is a configuration file that means the same
    assert config.to_dict(config.load(kept, environ={})) == config.to_dict(config.AgentConfig())


def test_commented_out_conffile_is_all_comments() -> None:
    from agent.commands.config_cmd import conffile

    text = conffile(config.AgentConfig(), commented_out=True)
    assert all(not line or line.startswith("#") for line in text.splitlines())
    assert "#[serve]" in text and '#compat_socket = "/run/attestation-service/attestation.sock"' in text
