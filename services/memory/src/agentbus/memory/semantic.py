"""Semantic memory: save and search texts by meaning, with an embedding cache.

Wires the embedding model to the database: a text's embedding is looked up by
(model, SHA-256 of the text) first and computed only on a miss, so the same text is
never embedded twice (not across requests, replicas or restarts).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from agentbus.contracts import MemorySaveRequest, MemorySearchRequest, new_id

from . import domain
from .adapters.db import Database
from .adapters.embeddings import Embedder, Vector


@dataclass
class SemanticMemory:
    db: Database
    embedder: Embedder
    max_chars: int = 20_000
    ef_search: int = 100

    async def start(self, *, hnsw_m: int = 16, hnsw_ef_construction: int = 64) -> None:
        """Load the model and bind (or check) the database's embedding dimension."""
        await self.embedder.start()
        await self.db.prepare_embeddings(
            self.embedder.name,
            self.embedder.dimension,
            hnsw_m=hnsw_m,
            hnsw_ef_construction=hnsw_ef_construction,
        )

    async def embed(self, texts: Sequence[str]) -> list[Vector]:
        """Embeddings of ``texts`` in order: from the cache, else from the model (once)."""
        model = self.embedder.name
        hashes = [domain.content_hash(t) for t in texts]
        found = await self.db.cached_embeddings(model, list(dict.fromkeys(hashes)))
        missing = {h: t for h, t in zip(hashes, texts, strict=True) if h not in found}
        if missing:
            vectors = await self.embedder.embed(list(missing.values()))
            fresh = list(zip(missing, vectors, strict=True))
            await self.db.cache_embeddings(model, fresh)
            found.update(fresh)
        return [found[h] for h in hashes]

    async def save(self, request: MemorySaveRequest) -> str:
        text = domain.check_size(request.text, self.max_chars)
        (embedding,) = await self.embed([text])
        memory = domain.NewMemory(
            memory_id=new_id("mem"),
            text=text,
            kind=request.kind,
            metadata=request.metadata,
            task_id=request.task_id,
            source=request.source,
        )
        await self.db.save_memory(memory, embedding)
        return memory.memory_id

    async def search(self, request: MemorySearchRequest) -> list[domain.Found]:
        query = domain.check_size(request.query, self.max_chars, "query")
        (embedding,) = await self.embed([query])
        filters = domain.MemoryQuery(
            k=request.k,
            kind=request.kind,
            task_id=request.task_id,
            metadata=request.metadata,
            min_score=request.min_score,
        )
        return await self.db.search_memories(embedding, filters, ef_search=self.ef_search)
