"""The `clipsvc` client commands and the Python client exactly as the README shows them.

The commands of the README's "First calls" block (and the `--model` line of "Several
models") are read from README.md and run as real `clipsvc` processes against a real
gateway on a free loopback port; what they print or write is checked against the
gateway's own gRPC answers for the same inputs. The README's Python example runs as
written (file paths as image inputs) against the same gateway.

The gateway serves two models: the trained demo as `shapes` (the default) and a
random-weight one as `large` (the name the README's `--model` line uses). The default
is not first in the repository's order (`large` sorts before `shapes`), so "default
first" is something the commands must really do.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from service.api.clip.v1 import clip_pb2
from service.client import ClipClient, decode_embedding
from service.demo.shapes import render
from service.model.export import export_model
from service.model.metadata import repository_names
from service.processes.child_server import free_port
from service.processes.gateway import gateway_settings, running_gateway
from service.server.app import Gateway
from tests.support.gateway import stub_for
from tests.support.images import encode, photo_like
from tests.support.paths import DEMO_WEIGHTS, REPO_ROOT

pytestmark = pytest.mark.integration

README = (REPO_ROOT / "README.md").read_text()
DEFAULT, OTHER = "shapes", "large"
# A CLI call is a Python start and one or a few RPCs on a tiny model: far below this.
CLI_DEADLINE_S = 180.0


def _readme_section(title: str) -> str:
    """The README's text from the heading `title` to the next heading of any level."""
    start = README.index(f"\n{title}\n")
    following = re.search(r"\n#{1,6} ", README[start + len(title) + 2 :])
    end = start + len(title) + 2 + following.start() if following else len(README)
    return README[start:end]


def _readme_clipsvc_lines(text: str) -> list[list[str]]:
    """The arguments of every `.venv/bin/clipsvc ...` line of `text` (comments dropped)."""
    return [
        shlex.split(line, comments=True)[1:]
        for line in text.splitlines()
        if line.startswith(".venv/bin/clipsvc ")
    ]


FIRST_CALLS = {args[0]: args for args in _readme_clipsvc_lines(_readme_section("## First calls"))}


@dataclass(frozen=True)
class Served:
    """The gateway and the folder the README's commands run in (my_shape.png, photos/)."""

    gateway: Gateway
    workdir: Path


@pytest.fixture(scope="module")
def two_model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained demo exported as `shapes`, random weights of its architecture as `large`."""
    repository = tmp_path_factory.mktemp("cli_repo")
    export_model("clip-demo-shapes", str(DEMO_WEIGHTS), repository, progress=False, name=DEFAULT)
    export_model("clip-demo-shapes", "none", repository, progress=False, name=OTHER)
    # The repository's own order puts the default second.
    assert repository_names(repository) == [OTHER, DEFAULT]
    return repository


def _write_workdir(workdir: Path) -> None:
    """`my_shape.png` (a red circle the demo knows) and `photos/` with images of every
    suffix kind in nested folders, and a file that is not an image."""
    render("red", "circle", random.Random(7)).save(workdir / "my_shape.png")
    photos = workdir / "photos"
    (photos / "trip" / "day2").mkdir(parents=True)
    images = {
        "beach.jpg": ("JPEG", photo_like(96, 80, seed=1)),
        "trip/star.png": ("PNG", render("blue", "star", random.Random(2))),
        "trip/Hexagon.WEBP": ("WEBP", render("green", "hexagon", random.Random(3))),
        "trip/day2/square.bmp": ("BMP", render("yellow", "square", random.Random(4))),
        "trip/day2/wide.jpeg": ("JPEG", photo_like(200, 50, seed=5)),
    }
    for name, (fmt, image) in images.items():
        (photos / name).write_bytes(encode(image, fmt))
    (photos / "notes.txt").write_text("not an image\n")


@pytest.fixture(scope="module")
async def served(
    two_model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Served]:
    workdir = tmp_path_factory.mktemp("cli_workdir")
    _write_workdir(workdir)
    settings = gateway_settings(two_model_repository, default_model=DEFAULT)
    async with running_gateway(settings) as gw:
        yield Served(gw, workdir)


async def _clipsvc(
    served: Served, args: list[str], target: str = ""
) -> subprocess.CompletedProcess[str]:
    """`clipsvc ARGS` in a child process, in the work folder, aimed at the gateway (or
    `target`) through CLIP_TARGET (so the README's arguments run unchanged). The child
    runs this tree's `service` package: `-m service.cli` is what the `clipsvc` script
    calls."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIP_")}
    env["CLIP_TARGET"] = target or f"127.0.0.1:{served.gateway.port}"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service.cli",
        *args,
        cwd=served.workdir,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), CLI_DEADLINE_S)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    return subprocess.CompletedProcess(args, process.returncode or 0, out.decode(), err.decode())


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result.stdout


def _fields(info: clip_pb2.ModelInfo) -> dict[str, object]:
    """A ModelInfo's set fields by name, as plain JSON values."""
    return json.loads(json.dumps({f.name: v for f, v in info.ListFields()}))


def test_the_readme_shows_the_client_commands_and_clipsvc_is_service_cli() -> None:
    assert set(FIRST_CALLS) == {
        "info",
        "models",
        "embed-text",
        "classify",
        "similarity",
        "embed-dir",
    }
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    # `.venv/bin/clipsvc` runs `service.cli:main`, the same `main` that `-m service.cli` runs.
    assert scripts["clipsvc"] == "service.cli:main"
    assert "__main__" in (REPO_ROOT / "service" / "cli.py").read_text()


async def test_info_and_models_print_what_the_gateway_serves_default_first(
    served: Served,
) -> None:
    info = json.loads(_ok(await _clipsvc(served, FIRST_CALLS["info"])))
    listed = [
        json.loads(line) for line in _ok(await _clipsvc(served, FIRST_CALLS["models"])).splitlines()
    ]
    async with stub_for(served.gateway.port) as stub:
        want_info = await stub.GetModelInfo(clip_pb2.GetModelInfoRequest(), timeout=30)
        want_list = await stub.ListModels(clip_pb2.ListModelsRequest(), timeout=30)
    assert info == _fields(want_info) and info["name"] == DEFAULT
    assert listed == [_fields(m) for m in want_list.models]
    # Every served model, the default first (the repository lists it second).
    assert [m["name"] for m in listed] == [DEFAULT, OTHER]
    other = json.loads(_ok(await _clipsvc(served, ["info", "--model", OTHER])))
    assert other == listed[1] and other["weights_sha256"] != info["weights_sha256"]


async def test_embed_text_prints_the_gateways_vectors_by_model(served: Served) -> None:
    args = FIRST_CALLS["embed-text"]
    texts = args[1:]
    assert texts == ["a red circle", "a photo of a blue star"]
    shown = [json.loads(line) for line in _ok(await _clipsvc(served, args)).splitlines()]
    full = [
        json.loads(line) for line in _ok(await _clipsvc(served, [*args, "--full"])).splitlines()
    ]
    # The README's `--model` line (section "Several models"), and the same text by default.
    several = _readme_clipsvc_lines(_readme_section("### Several models in one repository"))
    (model_line,) = [line for line in several if line[0] == "embed-text"]
    assert model_line == ["embed-text", "--model", OTHER, "a red circle"]
    by_other = [json.loads(line) for line in _ok(await _clipsvc(served, model_line)).splitlines()]
    by_other_full = [
        json.loads(line)
        for line in _ok(await _clipsvc(served, [*model_line, "--full"])).splitlines()
    ]
    async with stub_for(served.gateway.port) as stub:
        answer = await stub.EmbedText(clip_pb2.EmbedTextRequest(texts=texts), timeout=30)
        other = await stub.EmbedText(
            clip_pb2.EmbedTextRequest(texts=texts[:1], model=OTHER), timeout=30
        )
    want = np.stack([decode_embedding(e) for e in answer.embeddings])
    want_other = decode_embedding(other.embeddings[0])
    assert [s["input"] for s in shown] == texts and [s["dim"] for s in shown] == [64, 64]
    # The short form: the first six values rounded to 4 decimals, then "...".
    for line, vector in zip(shown, want, strict=True):
        assert line["vector"][-1] == "..." and len(line["vector"]) == 7
        np.testing.assert_allclose(line["vector"][:6], vector[:6], atol=5.1e-5)
    # --full: the whole float32 vectors, exactly what EmbedText answers.
    assert [s["input"] for s in full] == texts
    np.testing.assert_array_equal(np.array([s["vector"] for s in full], np.float32), want)
    # --model large: that model's vector, not the default's.
    assert [s["input"] for s in by_other] == ["a red circle"] and len(by_other_full) == 1
    np.testing.assert_array_equal(np.array(by_other_full[0]["vector"], np.float32), want_other)
    assert np.abs(want_other - want[0]).max() > 1e-3
    np.testing.assert_allclose(by_other[0]["vector"][:6], want_other[:6], atol=5.1e-5)


_LABEL_LINE = re.compile(r"^  \s*(\d+\.\d\d)%  (.+)  \(cosine (-?\d\.\d{3})\)$")
_SCORE_LINE = re.compile(r"^  cosine\s+(-?\d\.\d{4})  p\s+(\d+\.\d\d)%  (.+)$")


async def test_classify_ranks_the_labels_as_the_gateway_does(served: Served) -> None:
    args = FIRST_CALLS["classify"]
    assert args[1] == "my_shape.png" and args[2] == "--labels"
    labels = args[3:]
    lines = _ok(await _clipsvc(served, args)).splitlines()
    async with stub_for(served.gateway.port) as stub:
        answer = await stub.Classify(
            clip_pb2.ClassifyRequest(
                images=[(served.workdir / "my_shape.png").read_bytes()], labels=labels, top_k=5
            ),
            timeout=60,
        )
    want = answer.results[0].labels
    assert lines[0] == "my_shape.png" and len(lines) == 1 + len(labels), lines
    parsed = [_LABEL_LINE.match(line) for line in lines[1:]]
    assert all(parsed), lines
    # The same labels in the same order (the top one first), with the same numbers.
    assert [m[2] for m in parsed] == [w.label for w in want]
    assert want[0].label == "red circle"  # the trained demo sees its red circle
    for match, label in zip(parsed, want, strict=True):
        assert abs(float(match[1]) / 100 - label.probability) <= 5.1e-5
        assert abs(float(match[3]) - label.score) <= 5.1e-4


async def test_a_refused_call_or_no_server_is_one_line_and_exit_1_not_a_traceback(
    served: Served,
) -> None:
    nobody = f"127.0.0.1:{free_port()}"  # nothing listens there
    runs = {
        "no server": await _clipsvc(served, ["embed-text", "hello", "--timeout", "5"], nobody),
        "no server, index": await _clipsvc(served, ["index", "photos", "--timeout", "5"], nobody),
        "refused": await _clipsvc(served, ["classify", "my_shape.png", "--labels", "a", "a"]),
    }
    for name, run in runs.items():
        assert run.returncode == 1, (name, run)
        assert "Traceback" not in run.stderr, (name, run.stderr)
    assert runs["no server"].stderr.startswith("clipsvc: UNAVAILABLE: "), runs["no server"]
    assert "clipsvc: UNAVAILABLE: " in runs["no server, index"].stderr
    assert runs["refused"].stderr.startswith("clipsvc: INVALID_ARGUMENT: "), runs["refused"]
    assert "label" in runs["refused"].stderr
    # A bad --workers (or CLIP_WORKERS) is a usage error, exit 2, naming the flag.
    bad = await _clipsvc(served, ["embed-dir", "photos", "--out", "x.npy", "--workers", "-1"])
    assert bad.returncode == 2 and "--workers" in bad.stderr and "Traceback" not in bad.stderr


async def test_similarity_reads_at_path_arguments_as_images(served: Served) -> None:
    args = FIRST_CALLS["similarity"]
    queries = args[args.index("--queries") + 1 : args.index("--candidates")]
    candidates = args[args.index("--candidates") + 1 :]
    assert queries == ["a red circle"] and candidates == ["@my_shape.png", "a blue star"]
    lines = _ok(await _clipsvc(served, args)).splitlines()
    shape = (served.workdir / "my_shape.png").read_bytes()
    async with stub_for(served.gateway.port) as stub:
        answer = await stub.Similarity(
            clip_pb2.SimilarityRequest(
                queries=[clip_pb2.Item(text=queries[0])],
                candidates=[clip_pb2.Item(image=shape), clip_pb2.Item(text=candidates[1])],
            ),
            timeout=60,
        )
        # What the CLI would have printed had it sent "@my_shape.png" as a text.
        as_text = await stub.Similarity(
            clip_pb2.SimilarityRequest(
                queries=[clip_pb2.Item(text=queries[0])],
                candidates=[clip_pb2.Item(text=candidates[0]), clip_pb2.Item(text=candidates[1])],
            ),
            timeout=60,
        )
    row = answer.rows[0]
    assert abs(row.scores[0] - as_text.rows[0].scores[0]) > 1e-3  # the two are told apart
    assert lines[0] == queries[0] and len(lines) == 3, lines
    parsed = [_SCORE_LINE.match(line) for line in lines[1:]]
    assert all(parsed), lines
    assert [m[3] for m in parsed] == candidates
    for j, match in enumerate(parsed):
        assert abs(float(match[1]) - row.scores[j]) <= 5.1e-5
        assert abs(float(match[2]) / 100 - row.probabilities[j]) <= 5.1e-5


async def test_embed_dir_writes_each_image_files_vector_on_the_row_its_path_names(
    served: Served,
) -> None:
    args = FIRST_CALLS["embed-dir"]
    assert args == ["embed-dir", "photos/", "--out", "vectors.npy"]
    out = _ok(await _clipsvc(served, args))
    vectors = np.load(served.workdir / "vectors.npy")
    paths = (served.workdir / "vectors.paths.txt").read_text().splitlines()
    photos = served.workdir / "photos"
    images = {
        "beach.jpg",
        "trip/star.png",
        "trip/Hexagon.WEBP",
        "trip/day2/square.bmp",
        "trip/day2/wide.jpeg",
    }
    assert sorted(paths) == sorted(images)  # every image once, notes.txt left out
    assert f"embedded {len(images)}/{len(images)} images" in out
    # The server takes pixels: the command decodes here and sends them (issue 28).
    assert "sending pixels made by" in out
    async with stub_for(served.gateway.port) as stub:
        answer = await stub.EmbedImage(
            clip_pb2.EmbedImageRequest(images=[(photos / p).read_bytes() for p in paths]),
            timeout=120,
        )
    want = np.stack([decode_embedding(e) for e in answer.embeddings])
    assert vectors.dtype == np.float32 and vectors.shape == (len(images), 64)
    # Row i is the vector of the file on line i, as EmbedImage answers it. The stream's
    # pixels reach the model in batches of other sizes than this one call's, and CPU
    # matmuls of other batch sizes differ in the last bits (≤ 2e-7 seen): not bit for bit.
    np.testing.assert_allclose(vectors, want, atol=1e-6, rtol=0)
    assert len({row.tobytes() for row in vectors}) == len(images)  # all different images
    # --no-pixels sends the files themselves: the same vectors.
    plain = _ok(await _clipsvc(served, [*args[:-1], "plain.npy", "--no-pixels"]))
    assert "sending encoded files" in plain
    np.testing.assert_allclose(np.load(served.workdir / "plain.npy"), vectors, atol=1e-6, rtol=0)


async def test_the_readme_python_example_runs_with_file_paths(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    block = README.split("From Python (`service/client.py`", 1)[1]
    code = block.split("```python\n", 1)[1].split("```", 1)[0]
    assert '"localhost:50051"' in code and '["shape.png"]' in code
    target = f"127.0.0.1:{served.gateway.port}"
    code = code.replace('"localhost:50051"', repr(target))
    shape = served.workdir / "shape.png"
    shape.write_bytes(encode(render("blue", "star", random.Random(11))))
    monkeypatch.chdir(served.workdir)  # the example names its image relative to here
    namespace: dict[str, object] = {}
    # The sync client blocks: run it off the event loop that serves the gateway.
    await asyncio.to_thread(exec, compile(code, "README.md", "exec"), namespace)
    blob = shape.read_bytes()
    texts = ["a red circle", "a blue star"]
    async with stub_for(served.gateway.port) as stub:
        want_texts = await stub.EmbedText(clip_pb2.EmbedTextRequest(texts=texts), timeout=30)
        want_image = await stub.EmbedImage(clip_pb2.EmbedImageRequest(images=[blob]), timeout=30)
        want_scores = await stub.Similarity(
            clip_pb2.SimilarityRequest(
                queries=[clip_pb2.Item(text=texts[0])], candidates=[clip_pb2.Item(image=blob)]
            ),
            timeout=30,
        )
        want_labels = await stub.Classify(
            clip_pb2.ClassifyRequest(images=[blob], labels=["red circle", "blue star"], top_k=1),
            timeout=30,
        )
        want_other = await stub.EmbedText(
            clip_pb2.EmbedTextRequest(texts=texts[:1], model=OTHER), timeout=30
        )
    np.testing.assert_array_equal(
        namespace["texts"], np.stack([decode_embedding(e) for e in want_texts.embeddings])
    )
    # "shape.png" (a str) was read as the file's bytes, for EmbedImage and Classify.
    np.testing.assert_array_equal(
        namespace["images"], decode_embedding(want_image.embeddings[0])[None]
    )
    np.testing.assert_array_equal(namespace["scores"], [list(want_scores.rows[0].scores)])
    np.testing.assert_array_equal(
        namespace["probabilities"], [list(want_scores.rows[0].probabilities)]
    )
    (labels,) = namespace["labels"]
    assert [(x.label, x.probability, x.score) for x in labels] == [
        (x.label, x.probability, x.score) for x in want_labels.results[0].labels
    ]
    assert labels[0].label == "blue star"
    assert namespace["names"] == [DEFAULT, OTHER]
    np.testing.assert_array_equal(
        namespace["other"], decode_embedding(want_other.embeddings[0])[None]
    )
    # pathlib.Path inputs are files too.
    with ClipClient(target) as client:
        by_path = await asyncio.to_thread(client.embed_image, [shape])
        ranked = await asyncio.to_thread(client.classify, [shape], ["red circle", "blue star"])
    np.testing.assert_array_equal(by_path.vectors, namespace["images"])
    assert [x.label for x in ranked[0]] == ["blue star", "red circle"]
