"""One request's limits, checked in one place for both doors (gRPC and HTTP).

Each transport only decodes its request into plain values, calls one method here per
kind of call, and encodes what comes back. Everything a request is bounded by is
checked here, before any work: item counts, text / label / template sizes and their
encodability (the embedder's and scorer's own checks, reached only through here), the
answer's size on the caller's wire, and the deadline. A limit added later goes here
and holds on both doors.

The one thing a transport tells this module is what an answer costs on its wire
(`AnswerCosts`): protobuf packs a float in 4 bytes, JSON writes it in up to 24.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from service.core import validation
from service.core.embedder import EmbeddingResult
from service.core.image_preprocess import PresizedPixels
from service.core.models import ModelRegistry, ServedModel
from service.core.scoring import DEFAULT_TEMPLATES, Item, Ranked, SimilarityResult
from service.errors import AnswerTooLarge, InvalidInput


@dataclass(frozen=True)
class AnswerCosts:
    """Bytes one transport's answers take, rounded up (estimates that never undercount
    by much: the check refuses what would pass the send limit, before the work)."""

    #: Framing of one vector (message / object around it).
    per_vector: int
    #: Bytes per vector element, by the vector encoding the caller asked for.
    per_value: Mapping[str, float]
    #: Framing of one similarity row or one image's ranked labels.
    per_row: int
    #: One (score, probability) pair of a similarity row.
    per_score: int
    #: Framing of one ranked label (its scores included).
    per_label: int
    #: One label's text as the wire writes it (escapes included).
    label_bytes: Callable[[str], int]


@dataclass(frozen=True)
class Embedded:
    """What an embedding call answers: the model that made the vectors, and them in order."""

    model: ServedModel
    results: list[EmbeddingResult]


@dataclass(frozen=True)
class Classified:
    """Each image's labels, ranked, and the model that ranked them."""

    model: ServedModel
    ranked: list[list[Ranked]]


@dataclass(frozen=True)
class Compared:
    """The similarity matrix and the model that made it."""

    model: ServedModel
    result: SimilarityResult


class Calls:
    """The calls both doors make, each checked in full before any work is done."""

    def __init__(
        self,
        models: ModelRegistry,
        *,
        max_answer_bytes: int,
        backend_timeout_s: float,
        costs: AnswerCosts,
    ) -> None:
        """`max_answer_bytes`: the transport's send limit (`--max-message-bytes`);
        `backend_timeout_s`: the budget of a call whose caller set no deadline."""
        self.models = models
        self._max_answer_bytes = max_answer_bytes
        self._backend_timeout_s = backend_timeout_s
        self._costs = costs

    # ------------------------------------------------------------------ checks
    def timeout(self, remaining_s: float | None) -> float:
        """The budget of a call: the caller's remaining deadline, at most the backend's."""
        if remaining_s is None:
            return self._backend_timeout_s
        return max(0.0, min(remaining_s, self._backend_timeout_s))

    def _check_answer(self, estimate: int, what: str) -> None:
        if estimate > self._max_answer_bytes:
            raise AnswerTooLarge(
                f"the answer would be about {estimate} bytes ({what}), over the send limit of "
                f"{self._max_answer_bytes} bytes (--max-message-bytes); split the request"
            )

    def check_vectors_answer(self, model: ServedModel, n: int, encoding: str) -> None:
        """`n` vectors of `model` in `encoding` fit in one answer (RESOURCE_EXHAUSTED if not)."""
        per_value = self._costs.per_value.get(encoding)
        if per_value is None:
            raise InvalidInput(
                f"unknown vector encoding {encoding!r}; use one of "
                f"{', '.join(self._costs.per_value)}",
                field="encoding_format",
            )
        dim = model.embedder.metadata.embedding_dim
        per_vector = int(dim * per_value) + self._costs.per_vector
        self._check_answer(n * per_vector, f"{n} vectors")

    # ------------------------------------------------------------------ calls
    async def embed(
        self,
        model_name: str,
        items: Sequence[Item],
        *,
        field: str,
        encoding: str,
        language: str | None = None,
        remaining_s: float | None = None,
    ) -> Embedded:
        """Vectors for `items` (texts, encoded images and pre-sized pixels, which may mix), in
        order."""
        model = self.models.get(model_name)
        embedder = model.embedder
        validation.check_count(len(items), field, embedder.limits.max_items)
        self.check_vectors_answer(model, len(items), encoding)
        timeout_s = self.timeout(remaining_s)
        if all(isinstance(item, str) for item in items):
            texts = [str(item) for item in items]
            results = await embedder.embed_texts(
                texts, timeout_s=timeout_s, field=field, language=language
            )
        elif not any(isinstance(item, str) for item in items):
            embedder.check_language(language)
            images = [item for item in items if not isinstance(item, str)]
            results = await embedder.embed_images(images, timeout_s=timeout_s, field=field)
        else:
            results = await model.scorer.embed_results(items, field, timeout_s, language)
        return Embedded(model, results)

    async def similarity(
        self,
        model_name: str,
        queries: Sequence[Item],
        candidates: Sequence[Item],
        *,
        language: str | None = None,
        remaining_s: float | None = None,
    ) -> Compared:
        """Every query against every candidate (the scorer checks counts and items)."""
        model = self.models.get(model_name)
        limits = model.embedder.limits
        validation.check_count(len(queries), "queries", limits.max_items)
        validation.check_count(len(candidates), "candidates", limits.max_items)
        rows, columns = len(queries), len(candidates)
        costs = self._costs
        self._check_answer(
            rows * (columns * costs.per_score + costs.per_row), f"{rows} × {columns} scores"
        )
        result = await model.scorer.similarity(
            queries, candidates, timeout_s=self.timeout(remaining_s), language=language
        )
        return Compared(model, result)

    async def classify(
        self,
        model_name: str,
        images: Sequence[bytes | PresizedPixels],
        labels: Sequence[str],
        templates: Sequence[str],
        top_k: int,
        *,
        language: str | None = None,
        remaining_s: float | None = None,
    ) -> Classified:
        """Zero-shot: each image's labels ranked (the labels checked before their size
        in the answer is weighed, so that an unencodable label is named as such)."""
        model = self.models.get(model_name)
        limits = model.embedder.limits
        validation.check_labels(
            labels, templates, limits, ensemble_size=len(templates or DEFAULT_TEMPLATES)
        )
        k = validation.check_top_k(top_k, len(labels))
        validation.check_count(len(images), "images", limits.max_items)
        costs = self._costs
        longest = sorted((costs.label_bytes(label) for label in labels), reverse=True)[:k]
        per_image = sum(longest) + k * costs.per_label + costs.per_row
        self._check_answer(len(images) * per_image, f"{k} labels per image")
        ranked = await model.scorer.classify(
            images,
            labels,
            templates,
            top_k,
            timeout_s=self.timeout(remaining_s),
            language=language,
        )
        return Classified(model, ranked)

    async def token_counts(
        self,
        model: ServedModel,
        items: Sequence[Item],
        results: Sequence[EmbeddingResult],
        language: str | None = None,
    ) -> int:
        """Tokens the model read of the texts among `items` (OpenAI's `usage`): the counts
        the embedding kept, the rest counted off the event loop."""
        texts = [(i, item) for i, item in enumerate(items) if isinstance(item, str)]
        known = [results[i].tokens for i, _ in texts]
        missing = [text for (_, text), count in zip(texts, known, strict=True) if count is None]
        counted = await model.embedder.count_tokens(missing, language) if missing else []
        return sum(c for c in known if c is not None) + sum(counted)
