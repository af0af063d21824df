"""A JSON call to a gateway's HTTP API with the standard library: the status and the body.

Blocking: tests with an in-process gateway run it in a thread (`asyncio.to_thread`), so
the event loop that serves the call keeps running.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from typing import Any


def http_json(
    port: int,
    path: str,
    body: Any = None,
    *,
    key: str | None = None,
    timeout_s: float = 120.0,
) -> tuple[int, Any]:
    """GET `path` (no body) or POST `body` as JSON to 127.0.0.1:`port`; `key` goes in
    `Authorization: Bearer`. Returns the status and the decoded JSON answer, errors too."""
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers=headers,
        method="GET" if body is None else "POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def http_raw(
    port: int,
    path: str,
    data: bytes | None = None,
    *,
    method: str | None = None,
    timeout_s: float = 120.0,
) -> tuple[int, dict[str, str], Any]:
    """`data` sent as it is (no JSON encoding: broken or hostile bodies); the status, the
    headers (lower-case names) and the decoded JSON answer (None when it is not JSON)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=data,
        headers={"Content-Type": "application/json"},
        method=method or ("GET" if data is None else "POST"),
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            status, headers, raw = response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        status, headers, raw = exc.code, exc.headers, exc.read()
    try:
        answer = json.loads(raw)
    except ValueError:
        answer = None
    return status, {k.lower(): v for k, v in headers.items()}, answer


def image_input(blob: bytes) -> dict[str, str]:
    """One `/v1/embeddings` input item holding an encoded image."""
    return {"image": base64.b64encode(blob).decode()}
