"""OpenAI's official Node client (issue 26) against a real gateway over loopback: its
defaults (base64 asked for and decoded), every image form, model retrieval and the
refusals. The client is installed by scripts/install_node_openai.sh (`make system-deps`);
missing, it is installed here, never skipped."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import openai
import pytest

from service.server.app import Gateway
from tests.support.images import encode, photo_like
from tests.support.models import ExportedModel
from tests.support.paths import REPO_ROOT
from tests.support.reference import exported_image_vectors

pytestmark = pytest.mark.integration

NODE_OPENAI = REPO_ROOT / ".tools" / "node-openai" / "node_modules" / "openai"
SCRIPT = Path(__file__).with_name("node_openai.cjs")


def _node_openai() -> Path:
    if not NODE_OPENAI.exists():
        subprocess.run(
            ["bash", str(REPO_ROOT / "scripts" / "install_node_openai.sh")], check=True, timeout=300
        )
    return NODE_OPENAI


async def test_the_node_client_s_defaults_and_every_image_form(
    gateway: Gateway, demo_model: ExportedModel
) -> None:
    png = encode(photo_like(80, 60, seed=2601), "PNG")
    base_url = f"http://127.0.0.1:{gateway.http_port}/v1"
    process = await asyncio.create_subprocess_exec(
        "node",
        str(SCRIPT),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={
            **os.environ,
            "CLIP_BASE_URL": base_url,
            "CLIP_IMAGE_B64": base64.b64encode(png).decode(),
            "OPENAI_NODE_MODULE": str(_node_openai()),
        },
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, stderr.decode()[-3000:]
    out = json.loads(stdout)

    # The same vectors as Python's official client, whichever encoding each asked for.
    python = openai.AsyncOpenAI(base_url=base_url, api_key="unused")
    expected = await python.embeddings.create(
        model="clip", input=["a red circle", "a blue star"], encoding_format="float"
    )
    texts = np.array([d.embedding for d in expected.data], dtype=np.float32)
    np.testing.assert_array_equal(np.array(out["default_texts"], dtype=np.float32), texts)
    np.testing.assert_array_equal(np.array(out["float_texts"], dtype=np.float32), texts)
    assert out["default_model"] == "clip"
    # Each image form is the image's vector (open_clip's, within 1e-5), never a text's.
    reference = exported_image_vectors(demo_model, [png])
    for form in ("image_modality", "image_part", "image_object"):
        got = np.array(out[form], dtype=np.float32)
        assert got.shape == reference.shape, form
        assert np.abs(got - reference).max() <= 1e-5, form
    assert out["retrieved"] == "clip" and "clip" in out["listed"]
    # Refusals the Node client surfaces with the status and the gateway's message.
    assert out["data_uri_as_text"]["status"] == 400
    assert "data: URI" in out["data_uri_as_text"]["message"]
    assert out["token_ids"]["status"] == 400
    assert "check_embedding_ctx_length=False" in out["token_ids"]["message"]
    assert out["unknown_model"]["status"] == 404
    assert "clip" in out["unknown_model"]["message"]
