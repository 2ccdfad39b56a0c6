"""Settings from flags and the environment, with the old server's variable names."""

from __future__ import annotations

from pathlib import Path

import pytest

from trioserve.cli import main
from trioserve.config import ConfigError, Settings, env_name, load_settings


def test_old_server_environment_names() -> None:
    env = {
        "HF_MODEL": "mesolitica/malaysian-llama-3-8b-instruct-16k",
        "HOTLOAD": "true",
        "TORCH_DTYPE": "bfloat16",
        "ATTN_IMPLEMENTATION": "flash_attention_2",
        "MAX_CONCURRENT": "3",
        "PORT": "9000",
    }
    settings = load_settings([], env)
    assert settings.model == "mesolitica/malaysian-llama-3-8b-instruct-16k"
    assert settings.hotload is True
    assert settings.torch_dtype == "bfloat16"
    assert settings.attn_implementation == "flash_attention_2"
    assert settings.max_concurrent == 3
    assert settings.port == 9000


def test_defaults() -> None:
    settings = load_settings([], {})
    assert settings.model is None
    assert settings.hotload is False
    assert settings.port == 7088
    assert settings.batch_size == settings.max_concurrent


def test_flags_win_over_environment() -> None:
    settings = load_settings(
        ["--port", "1234", "--no-hotload", "--max-batch-size", "1"], {"PORT": "9000", "HOTLOAD": "1"}
    )
    assert settings.port == 1234
    assert settings.hotload is False
    assert settings.batch_size == 1


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"HOTLOAD": "maybe"}, "HOTLOAD"),
        ({"MAX_CONCURRENT": "0"}, "MAX_CONCURRENT"),
        ({"TORCH_DTYPE": "int4"}, "TORCH_DTYPE"),
        ({"PORT": "http"}, "PORT"),
        ({"SSL_CERTFILE": "cert.pem"}, "together"),
    ],
)
def test_bad_values_name_the_setting(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_settings([], env)


def test_cli_reports_configuration_errors(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTN_IMPLEMENTATION", "flash_attention_2")
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "flash_attention_2" in err and "flash-attn" in err


def test_readme_documents_every_flag_and_environment_variable() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    missing = [
        name
        for name in Settings.model_fields
        if f"--{name.replace('_', '-')}" not in readme or f"`{env_name(name)}`" not in readme
    ]
    assert not missing
