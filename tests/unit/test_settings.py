"""Settings: every field is a flag with a CLIP_* twin; flags beat the environment."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from service.settings import Settings


def _parse(argv: list[str], environ: dict[str, str]) -> Settings:
    parser = argparse.ArgumentParser()
    Settings.add_arguments(parser)
    return Settings.from_sources(parser.parse_args(argv), environ)


def test_defaults_environment_and_flags_in_that_order() -> None:
    assert _parse([], {}) == Settings()
    env = {"CLIP_PORT": "6000", "CLIP_BACKEND": "triton", "CLIP_EXIF_TRANSPOSE": "false"}
    from_env = _parse([], env)
    assert (from_env.port, from_env.backend, from_env.exif_transpose) == (6000, "triton", False)
    flagged = _parse(["--port", "7000", "--exif-transpose"], env)
    assert (flagged.port, flagged.exif_transpose, flagged.backend) == (7000, True, "triton")


def test_lists_paths_and_buckets() -> None:
    s = _parse(
        ["--api-keys", "k1, k2", "--text-length-buckets", "32,8,16,8"],
        {"CLIP_TLS_CERT": "/etc/cert.pem", "CLIP_API_KEYS_FILE": ""},
    )
    assert s.api_keys == ("k1", "k2")
    assert s.text_length_buckets == (8, 16, 32)
    assert s.tls_cert == Path("/etc/cert.pem") and s.api_keys_file is None


@pytest.mark.parametrize(
    ("env", "says"),
    [({"CLIP_PORT": "fifty"}, "port"), ({"CLIP_BACKEND": "gpu"}, "choose one of")],
)
def test_bad_values_stop_with_a_message(env: dict[str, str], says: str) -> None:
    with pytest.raises(SystemExit) as err:
        _parse([], env)
    assert says in str(err.value)


def test_every_field_has_help_and_an_environment_twin() -> None:
    parser = argparse.ArgumentParser()
    Settings.add_arguments(parser)
    helps = {a.dest: a.help for a in parser._actions if a.dest != "help"}
    assert set(helps) == set(Settings.__dataclass_fields__)
    for name, text in helps.items():
        assert f"[env CLIP_{name.upper()}]" in text


def test_settings_log_masks_secrets() -> None:
    key = "key-alpha-0123456789"
    settings = Settings(api_keys=(key,), redis_url="redis://:hunter2@redis:6379/0")
    shown = str(settings.masked())
    assert key not in shown and "hunter2" not in shown
