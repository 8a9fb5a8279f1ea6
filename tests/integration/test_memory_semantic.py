"""Semantic memory through the running service, with the real all-MiniLM-L6-v2 model,
against a real Postgres + pgvector: save/search over request/reply, search quality on a
small labelled set, filters, the embedding cache, refusals."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import numpy as np
import pytest
from faststream import FastStream, TestApp
from faststream.nats import NatsBroker

from agentbus.cli import client
from agentbus.contracts import (
    MemorySaveReply,
    MemorySaveRequest,
    MemorySearchReply,
    MemorySearchRequest,
    new_id,
    subjects,
)
from agentbus.core.bus import jetstream, rpc
from agentbus.core.settings import BusSettings
from agentbus.memory import Settings, create_app
from agentbus.memory.adapters.db import Database, EmbeddingSpaceMismatch, run_migrations
from agentbus.memory.adapters.embeddings import LOCAL_MODEL_NAME, LocalEmbedder
from agentbus.memory.domain import MemoryQuery
from tests.integration.test_memory_service import minilm, with_database

pytestmark = pytest.mark.integration

# A small labelled set: five topics, three memories each, and one query per topic that
# shares (almost) no words with its memories. Every memory of the query's topic must
# rank above every memory of the other topics.
TOPICS: dict[str, list[str]] = {
    "python": [
        "Use a virtual environment so each project's Python packages stay separate.",
        "List comprehensions build a new list from an iterable in a single expression.",
        "pip installs Python libraries from the Python Package Index.",
    ],
    "cooking": [
        "Simmer the tomato sauce for an hour so the flavours blend.",
        "Knead bread dough for ten minutes until it is smooth and elastic.",
        "Salt the pasta water generously before adding the spaghetti.",
    ],
    "weather": [
        "Heavy rain and strong winds are forecast for the coast tomorrow.",
        "The temperature will drop below freezing overnight, expect frost.",
        "A heatwave will bring sunny skies and temperatures above 35 degrees.",
    ],
    "finance": [
        "The central bank raised interest rates by a quarter of a point.",
        "Diversifying a portfolio across stocks and bonds lowers its risk.",
        "Quarterly earnings beat analyst expectations and the share price rose.",
    ],
    "astronomy": [
        "Jupiter is the largest planet in the solar system.",
        "A light-year is the distance light travels in one year.",
        "The telescope photographed a spiral galaxy millions of light-years away.",
    ],
}
QUERIES: list[tuple[str, str]] = [
    ("tips for programming in Python", "python"),
    ("recipe for making Italian food at home", "cooking"),
    ("will it be cold and wet this week", "weather"),
    ("should I invest my savings in the stock market", "finance"),
    ("planets, stars and outer space", "astronomy"),
]


@pytest.fixture(scope="module")
def embedder() -> LocalEmbedder:
    """The real model (loaded once per test session), counting what it embeds."""
    return LocalEmbedder(load=minilm)


@pytest.fixture(scope="module")
async def memory(
    nats_url: str, database_url: str, embedder: LocalEmbedder
) -> AsyncIterator[FastStream]:
    durable = f"memory-events-{uuid.uuid4().hex[:8]}"  # not the other modules' consumer
    settings = Settings(
        database_url=database_url, events_durable=durable, bus=BusSettings(nats_url=nats_url)
    )
    app = create_app(settings, embedder=embedder)
    async with TestApp(app):
        yield app
    async with client.connect(nats_url) as broker:
        js = jetstream(broker)
        await js.delete_consumer(subjects.EVENTS_STREAM, durable)


@pytest.fixture(scope="module")
async def broker(nats_url: str, memory: FastStream) -> AsyncIterator[NatsBroker]:
    async with client.connect(nats_url) as connected:
        yield connected


async def save(broker: NatsBroker, text: str, **fields: Any) -> MemorySaveReply:
    request = MemorySaveRequest(text=text, **fields)
    return await rpc(broker, subjects.MEMORY_SAVE, request, MemorySaveReply, timeout=30)


async def search(broker: NatsBroker, query: str, **fields: Any) -> MemorySearchReply:
    request = MemorySearchRequest(query=query, **fields)
    return await rpc(broker, subjects.MEMORY_SEARCH, request, MemorySearchReply, timeout=30)


async def raw_request(broker: NatsBroker, subject: str, body: Any) -> dict[str, Any]:
    msg = await broker.request(body, subject, timeout=10)
    reply: dict[str, Any] = json.loads(msg.body)
    return reply


# --- quality ---------------------------------------------------------------------------


async def test_related_memories_rank_above_unrelated_ones(broker: NatsBroker) -> None:
    suite = uuid.uuid4().hex  # this test's memories only
    topic_of: dict[str, str] = {}
    for topic, texts in TOPICS.items():
        for text in texts:
            reply = await save(broker, text, kind="fact", metadata={"suite": suite})
            assert reply.ok, reply.error
            assert reply.memory_id is not None
            topic_of[reply.memory_id] = topic

    for query, topic in QUERIES:
        reply = await search(broker, query, k=15, min_score=-1, metadata={"suite": suite})
        assert reply.ok, reply.error
        ranked = [topic_of[hit.memory_id] for hit in reply.hits]
        assert len(ranked) == 15
        # every memory of the right topic comes before every other memory
        assert ranked[:3] == [topic] * 3, (query, [(h.score, h.text) for h in reply.hits])
        scores = [hit.score for hit in reply.hits]
        assert scores == sorted(scores, reverse=True)
        assert -1 <= scores[-1] < scores[0] <= 1


async def test_filters_by_kind_task_metadata_and_least_score(broker: NatsBroker) -> None:
    suite = uuid.uuid4().hex
    task_a, task_b = new_id("tsk"), new_id("tsk")
    rows = [
        ("The build uses make and runs pytest.", "fact", task_a, {"lang": "en", "n": 1}),
        ("The build failed because a test timed out.", "result", task_a, {"lang": "en"}),
        ("Le build utilise make et pytest.", "fact", task_b, {"lang": "fr"}),
        ("Bananas are rich in potassium.", "fact", task_b, {"lang": "en"}),
    ]
    for text, kind, task_id, tags in rows:
        reply = await save(broker, text, kind=kind, task_id=task_id, metadata={**tags, "s": suite})
        assert reply.ok, reply.error

    def texts(reply: MemorySearchReply) -> set[str]:
        assert reply.ok, reply.error
        return {hit.text for hit in reply.hits}

    query = "how is the project built and tested"
    everything = texts(await search(broker, query, k=10, min_score=-1, metadata={"s": suite}))
    assert everything == {r[0] for r in rows}
    assert texts(
        await search(broker, query, k=10, min_score=-1, kind="result", metadata={"s": suite})
    ) == {rows[1][0]}
    assert texts(
        await search(broker, query, k=10, min_score=-1, task_id=task_b, metadata={"s": suite})
    ) == {
        rows[2][0],
        rows[3][0],
    }
    assert texts(
        await search(broker, query, k=10, min_score=-1, metadata={"s": suite, "lang": "en"})
    ) == {
        rows[0][0],
        rows[1][0],
        rows[3][0],
    }
    assert texts(
        await search(broker, query, k=10, min_score=-1, metadata={"s": suite, "n": 1})
    ) == {rows[0][0]}
    relevant = await search(broker, query, k=10, min_score=0.3, metadata={"s": suite})
    assert rows[3][0] not in texts(relevant)  # bananas: below the least score
    assert all(hit.score >= 0.3 for hit in relevant.hits)
    hit = next(h for h in relevant.hits if h.text == rows[0][0])
    assert (hit.kind, hit.task_id, hit.metadata) == (
        "fact",
        task_a,
        {"lang": "en", "n": 1, "s": suite},
    )


async def test_a_filtered_search_returns_k_when_k_exist(database_url: str) -> None:
    """Most memories near the query fail the filter; the HNSW scan must go on past them."""
    dim = 384
    near_tag, far_tag = {"grp": f"near-{uuid.uuid4().hex}"}, {"grp": f"far-{uuid.uuid4().hex}"}
    rng = np.random.default_rng(7)
    axis = np.zeros(dim, dtype=np.float32)
    axis[0] = 1.0
    other = np.zeros(dim, dtype=np.float32)
    other[1] = 1.0

    def unit(v: np.ndarray) -> np.ndarray:
        return (v / np.linalg.norm(v)).astype(np.float32)

    near = [unit(axis + 0.15 * rng.standard_normal(dim)) for _ in range(1500)]
    far = [unit(0.6 * axis + other + 0.15 * rng.standard_normal(dim)) for _ in range(30)]
    db = await Database.open(database_url, connect_retries=0)
    try:
        conn = await asyncpg.connect(database_url)
        try:
            from pgvector.asyncpg import register_vector

            await register_vector(conn)
            records = [
                (new_id("mem"), f"v{i}", json.dumps(near_tag if i < len(near) else far_tag), v)
                for i, v in enumerate(near + far)
            ]
            await conn.executemany(
                "INSERT INTO memories (memory_id, text, kind, metadata, source, embedding) "
                "VALUES ($1, $2, 'synthetic', $3::jsonb, 'test', $4)",
                records,
            )
            # Without an iterative scan the index hands over ef_search candidates, all of
            # the other kind, and the filter leaves (almost) nothing: the case being tested.
            async with conn.transaction():
                await conn.execute("SET LOCAL hnsw.iterative_scan = off")
                await conn.execute("SET LOCAL enable_seqscan = off")
                await conn.execute("SET LOCAL enable_bitmapscan = off")
                await conn.execute("SET LOCAL enable_indexscan = on")
                plain = await conn.fetch(
                    "SELECT memory_id FROM memories WHERE metadata @> $2::jsonb "
                    "ORDER BY embedding <=> $1 LIMIT 10",
                    axis,
                    json.dumps(far_tag),
                )
        finally:
            await conn.close()
        found = await db.search_memories(axis, MemoryQuery(k=10, metadata=far_tag), ef_search=40)
    finally:
        await db.close()
    assert len(plain) < 10  # the test would catch a search without iterative scan
    assert len(found) == 10
    assert all(f.metadata == far_tag for f in found)
    scores = [f.score for f in found]
    assert scores == sorted(scores, reverse=True)


# --- the cache ---------------------------------------------------------------------------


async def test_the_same_text_is_embedded_once(
    broker: NatsBroker, embedder: LocalEmbedder, database_url: str
) -> None:
    text = f"The deploy key for project {uuid.uuid4().hex} lives in the vault."
    before = embedder.texts_embedded
    first = await save(broker, text, kind="fact")
    assert first.ok, first.error
    assert embedder.texts_embedded == before + 1
    again = await save(broker, text, kind="note")  # another memory, same text
    found = await search(broker, text, k=1)  # a query with the same text
    assert again.ok and found.ok
    assert embedder.texts_embedded == before + 1  # both served from the cache
    assert found.hits[0].text == text
    assert found.hits[0].score == pytest.approx(1.0, abs=1e-5)
    await search(broker, text + " Rotated yearly.", k=1)
    assert embedder.texts_embedded == before + 2

    conn = await asyncpg.connect(database_url)
    try:
        cached = await conn.fetchval(
            "SELECT count(*) FROM embedding_cache WHERE model = $1 AND sha256 = sha256($2::bytea)",
            LOCAL_MODEL_NAME,
            text.encode(),
        )
    finally:
        await conn.close()
    assert cached == 1


# --- refusals ----------------------------------------------------------------------------


async def test_a_text_longer_than_the_model_reads_is_refused_not_truncated(
    broker: NatsBroker, database_url: str
) -> None:
    marker = uuid.uuid4().hex
    text = f"{marker} " + "the quick brown fox jumps over the lazy dog " * 60  # ~540 tokens
    reply = await save(broker, text)
    assert not reply.ok
    assert reply.memory_id is None
    assert reply.error is not None
    assert "tokens" in reply.error and "at most 256" in reply.error
    assert "does not truncate" in reply.error
    query = await search(broker, text)
    assert not query.ok and query.error is not None and "at most 256" in query.error
    conn = await asyncpg.connect(database_url)
    try:
        stored = await conn.fetchval(
            "SELECT count(*) FROM memories WHERE text LIKE $1", f"{marker}%"
        )
    finally:
        await conn.close()
    assert stored == 0


@pytest.mark.parametrize(
    ("subject", "body", "problem"),
    [
        (subjects.MEMORY_SAVE, {"kind": "fact"}, "text: Field required"),
        (subjects.MEMORY_SAVE, {"text": ""}, "text: String should have at least 1 character"),
        (subjects.MEMORY_SAVE, {"text": "x" * 20_001}, "text: String should have at most 20000"),
        (subjects.MEMORY_SAVE, {"text": "ok", "metadata": "tags"}, "metadata: Input should be"),
        (subjects.MEMORY_SEARCH, {"query": "q", "k": 0}, "k: Input should be greater than"),
        (subjects.MEMORY_SEARCH, {"query": "q", "min_score": 3}, "min_score: Input should be"),
        (subjects.MEMORY_SEARCH, b"not json", "invalid"),
    ],
)
async def test_a_malformed_request_gets_an_error_reply(
    broker: NatsBroker, subject: str, body: Any, problem: str
) -> None:
    reply = await raw_request(broker, subject, body)
    assert reply["ok"] is False
    assert problem in reply["error"]


# --- the embedding space -------------------------------------------------------------------


async def test_the_database_is_bound_to_one_model_and_dimension(database_url: str) -> None:
    admin = await asyncpg.connect(database_url)
    name = f"emb_{uuid.uuid4().hex[:12]}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        dsn = with_database(database_url, name)
        await run_migrations(dsn)
        db = await Database.open(dsn, connect_retries=0)
        try:
            await db.prepare_embeddings("model-a", 8)
            await db.prepare_embeddings("model-a", 8)  # a second replica: nothing to do
            with pytest.raises(EmbeddingSpaceMismatch, match=r"holds 8-d embeddings of 'model-a'"):
                await db.prepare_embeddings("model-a", 16)
            with pytest.raises(EmbeddingSpaceMismatch, match="configured with 'model-b'"):
                await db.prepare_embeddings("model-b", 8)
        finally:
            await db.close()
        conn = await asyncpg.connect(dsn)
        try:
            column = await conn.fetchval(
                "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                "WHERE attrelid = 'memories'::regclass AND attname = 'embedding'"
            )
            index = await conn.fetchval(
                "SELECT indexdef FROM pg_indexes WHERE indexname = 'memories_embedding_hnsw'"
            )
        finally:
            await conn.close()
        assert column == "vector(8)"
        assert "hnsw" in index and "vector_cosine_ops" in index
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
