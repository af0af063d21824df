"""Several models in one repository: names, layout on disk, the default, and lookups."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from service.core.models import ModelRegistry, ServedModel, pick_default
from service.errors import ModelNotFound
from service.model.metadata import (
    ModelMetadata,
    check_name,
    load_repository,
    metadata_path,
    repository_names,
    tower_models,
)
from service.settings import ExportSettings, SettingsError


def _metadata(name: str = "clip") -> ModelMetadata:
    image, text = tower_models(name)
    return ModelMetadata(
        model_name="ViT-B-32",
        pretrained="none",
        weights_sha256="ab" * 32,
        embedding_dim=512,
        image_size=224,
        context_length=77,
        logit_scale=100.0,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        image_model=image,
        text_model=text,
        name=name,
    )


def test_names_are_plain() -> None:
    for good in ("clip", "ViT-L-14_openai", "a", "x" * 63, "m2"):
        assert check_name(good) == good
    for bad in ("", "-x", "_x", "a.b", "a/b", "a b", "x" * 64, "ü"):
        with pytest.raises(ValueError, match="bad model name"):
            check_name(bad)
    with pytest.raises(SettingsError, match="bad model name"):
        ExportSettings(model="ViT-B-32", out=Path("/tmp/x"), name="../up")


def test_layout_clip_at_the_root_others_beside_it(tmp_path: Path) -> None:
    assert metadata_path(tmp_path) == tmp_path / "metadata.json"
    assert metadata_path(tmp_path, "big") == tmp_path / "metadata.big.json"
    assert tower_models("big") == ("big_image", "big_text")
    assert repository_names(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="export a model first"):
        load_repository(tmp_path)
    _metadata("small").save(tmp_path)
    _metadata("big").save(tmp_path)
    assert repository_names(tmp_path) == ["big", "small"]
    _metadata("clip").save(tmp_path)
    (tmp_path / "metadata.bad name.json").write_text("{}")  # not a name: ignored
    assert repository_names(tmp_path) == ["clip", "big", "small"]
    loaded = load_repository(tmp_path)
    assert list(loaded) == ["clip", "big", "small"]
    assert loaded["big"].image_model == "big_image" and loaded["big"].name == "big"


def test_metadata_written_before_names_is_the_model_clip(tmp_path: Path) -> None:
    raw: dict[str, Any] = json.loads(json.dumps(_metadata().__dict__, default=list))
    del raw["name"]
    (tmp_path / "metadata.json").write_text(json.dumps(raw))
    (loaded,) = load_repository(tmp_path).values()
    assert loaded.name == "clip" and loaded.image_model == "clip_image"
    # The file decides the name, whatever it says inside.
    raw["name"] = "other"
    (tmp_path / "metadata.copy.json").write_text(json.dumps(raw))
    assert load_repository(tmp_path)["copy"].name == "copy"


def test_the_default_model() -> None:
    assert pick_default(["clip", "big"], "") == "clip"
    assert pick_default(["big"], "") == "big"
    assert pick_default(["clip", "big"], "big") == "big"
    with pytest.raises(ValueError, match="choose one with --default-model"):
        pick_default(["big", "small"], "")
    with pytest.raises(ValueError, match="'huge' is not in the repository; it has: big, small"):
        pick_default(["big", "small"], "huge")


def test_lookups_by_name_and_bounded_labels() -> None:
    models = [ServedModel(n, object(), object()) for n in ("big", "clip")]  # type: ignore[arg-type]
    registry = ModelRegistry(models, "clip")
    assert registry.names == ["clip", "big"]  # the default first
    assert registry.get("").name == "clip" and registry.get("big").name == "big"
    with pytest.raises(ModelNotFound, match="'huge' is not served here; known models: clip, big"):
        registry.get("huge")
    assert (registry.label(""), registry.label("big"), registry.label("huge")) == (
        "clip",
        "big",
        "",
    )
    with pytest.raises(ValueError, match="unique"):
        ModelRegistry([*models, models[0]], "clip")
    with pytest.raises(ValueError, match="default model 'x'"):
        ModelRegistry(models, "x")


def test_export_takes_a_name_from_its_flag_or_environment() -> None:
    from service.cli import build_parser

    args = build_parser().parse_args(["export", "--model", "ViT-B-32", "--out", "r"])
    assert ExportSettings.from_sources(args, environ={}).name == "clip"
    args = build_parser().parse_args(
        ["export", "--model", "ViT-B-32", "--out", "r", "--name", "large"]
    )
    assert ExportSettings.from_sources(args, environ={}).name == "large"
