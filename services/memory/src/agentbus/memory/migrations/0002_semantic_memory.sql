-- 0002: long-term semantic memory and the embedding cache.
-- Applied once, in a transaction, by agentbus.memory.adapters.db.migrate.
--
-- The embedding dimension is not written here: it comes from the configured model.
-- At start-up the service records its model and dimension in memory_space (the first
-- replica to start types memories.embedding as vector(n) and builds the HNSW index),
-- and refuses to start if the database already holds embeddings of another model.

-- Which embedding model (and so which dimension) the memories table holds. One row.
CREATE TABLE memory_space (
    id         boolean PRIMARY KEY DEFAULT true CHECK (id),
    model      text        NOT NULL,
    dimension  int         NOT NULL CHECK (dimension > 0),
    created_at timestamptz NOT NULL DEFAULT now()
);

-- What agents remember.
CREATE TABLE memories (
    memory_id  text PRIMARY KEY,
    text       text        NOT NULL,
    kind       text        NOT NULL,
    metadata   jsonb       NOT NULL DEFAULT '{}',
    task_id    text,
    source     text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    embedding  vector      NOT NULL  -- typed vector(n) once the model is known
);

CREATE INDEX memories_kind ON memories (kind);
CREATE INDEX memories_task ON memories (task_id);
CREATE INDEX memories_metadata ON memories USING gin (metadata jsonb_path_ops);

-- Every text ever embedded, per model, by the SHA-256 of its UTF-8 bytes: the same
-- text is never embedded twice. vector without a dimension: one table for any model.
CREATE TABLE embedding_cache (
    model      text        NOT NULL,
    sha256     bytea       NOT NULL,
    embedding  vector      NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model, sha256)
);

-- Time-range queries for people: tasks by creation time.
CREATE INDEX tasks_created_at ON tasks (created_at);
