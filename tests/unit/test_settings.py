"""Settings: every field is a flag with a CLIP_* twin; flags beat the environment."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from service.settings import (
    BatchingOptions,
    ExportSettings,
    Settings,
    SettingsError,
    TritonServerSettings,
    parse_value,
)


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
    with pytest.raises(SettingsError) as err:
        _parse([], env)
    assert says in str(err.value)


def test_every_field_has_help_and_an_environment_twin() -> None:
    parser = argparse.ArgumentParser()
    Settings.add_arguments(parser)
    helps = {a.dest: a.help for a in parser._actions if a.dest != "help"}
    assert set(helps) == {f.name for f in dataclasses.fields(Settings)}
    for name, text in helps.items():
        assert f"[env CLIP_{name.upper()}]" in text


def test_types_come_from_annotations_not_from_names() -> None:
    # A str field whose name ends like a path field (`_key`) stays a str.
    assert parse_value("hmac_key", str, " secret ") == "secret"
    assert parse_value("tls_key", Path | None, "") is None
    assert parse_value("ratio", float, "0.5") == 0.5
    assert parse_value("buckets", tuple[int, ...], "8, 16") == (8, 16)
    with pytest.raises(SettingsError, match="ratio"):
        parse_value("ratio", float, "half")


def test_constructing_with_a_bad_choice_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="choose one of embedded, triton"):
        Settings(backend="gpu")


def test_export_and_triton_flags_share_the_typed_definitions() -> None:
    parser = argparse.ArgumentParser()
    ExportSettings.add_arguments(parser)
    BatchingOptions.add_arguments(parser)
    args = parser.parse_args(["--model", "ViT-B-32", "--out", "repo", "--max-batch-size", "8"])
    export = ExportSettings.from_sources(args, {})
    assert (export.model, export.out, export.flavor) == ("ViT-B-32", Path("repo"), "python")
    assert BatchingOptions.from_sources(args, {}) == BatchingOptions(max_batch_size=8)
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", "repo"])  # --model is required
    triton = argparse.ArgumentParser()
    TritonServerSettings.add_arguments(triton)
    # `clipsvc triton` keeps its one environment twin, and only that one.
    env = {"CLIP_MODEL_REPOSITORY": "/models", "CLIP_PORT": "9999"}
    parsed = TritonServerSettings.from_sources(triton.parse_args([]), env)
    assert parsed.repository == Path("/models") and parsed.port == 8001


def test_settings_log_masks_secrets() -> None:
    key = "key-alpha-0123456789"
    settings = Settings(api_keys=(key,), redis_url="redis://:hunter2@redis:6379/0")
    shown = str(settings.masked())
    assert key not in shown and "hunter2" not in shown
