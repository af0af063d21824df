"""The models one gateway serves, by name: each its own pipeline, all behind one bound.

Every model of the repository gets an `Embedder` (its backend, batching queue and
tokenizer) and a `Scorer`; requests name a model (`model`, empty = the default) and
are answered by that model only, so vectors of different models never meet. What
bounds the process is shared: one `Admission` (items queued for any backend), one
cache and one label cache (keys carry the model id), one decode pool and its pixel budget.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from service.core.embedder import Embedder
from service.core.scoring import Scorer
from service.errors import ModelNotFound
from service.model.metadata import DEFAULT_NAME


@dataclass(frozen=True)
class ServedModel:
    """One named model: its pipeline and its scoring."""

    name: str
    embedder: Embedder
    scorer: Scorer


def pick_default(names: Sequence[str], configured: str) -> str:
    """The default model: `configured` when set (it must be served), else `clip` when
    served, else the only model; several and none of those is a configuration error."""
    if configured:
        if configured not in names:
            raise ValueError(
                f"--default-model {configured!r} is not in the repository; it has: "
                f"{', '.join(names)}"
            )
        return configured
    if DEFAULT_NAME in names:
        return DEFAULT_NAME
    if len(names) == 1:
        return names[0]
    raise ValueError(
        f"the repository has several models ({', '.join(names)}) and none is named "
        f"{DEFAULT_NAME!r}: choose one with --default-model"
    )


class ModelRegistry:
    """Name → `ServedModel`, with the default first; knows nothing of transports."""

    def __init__(self, models: Sequence[ServedModel], default: str) -> None:
        if not models:
            raise ValueError("a gateway needs at least one model")
        by_name = {m.name: m for m in models}
        if len(by_name) != len(models):
            raise ValueError("model names must be unique")
        if default not in by_name:
            raise ValueError(f"default model {default!r} is not among {', '.join(by_name)}")
        # The default first: ListModels and /v1/models show it first.
        self._models = {default: by_name[default], **by_name}
        self.default = default

    @property
    def names(self) -> list[str]:
        """Every served name, the default first."""
        return list(self._models)

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)

    def get(self, name: str = "") -> ServedModel:
        """The model called `name` ('' = the default); ModelNotFound naming the known ones."""
        model = self._models.get(name or self.default)
        if model is None:
            raise ModelNotFound(name, self.names)
        return model

    def label(self, name: str) -> str:
        """`name` as a metric label: a served name (the default for ''), or '' for unknown
        names, so that callers cannot grow the label's values."""
        resolved = name or self.default
        return resolved if resolved in self._models else ""

    @property
    def default_embedder(self) -> Embedder:
        """The default model's pipeline."""
        return self._models[self.default].embedder

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start every backend (each may not be reachable yet; health keeps asking)."""
        await asyncio.gather(*(m.embedder.start() for m in self))

    async def aclose(self) -> None:
        """Stop every pipeline (the shared cache is closed by each: closing is idempotent)."""
        for model in self:
            await model.embedder.aclose()
