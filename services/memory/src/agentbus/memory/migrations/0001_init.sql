-- 0001: the event log and the task projection.
-- Applied once, in a transaction, by agentbus.memory.adapters.db.migrate.

-- pgvector: semantic memory (a later migration) stores embeddings as vector(n).
CREATE EXTENSION IF NOT EXISTS vector;

-- Every lifecycle event of every task, as published. event_id is unique, so a
-- redelivered or republished event is stored once.
CREATE TABLE events (
    event_id       text PRIMARY KEY,
    task_id        text        NOT NULL,
    type           text        NOT NULL,  -- e.g. step.completed; unknown types are kept too
    subject        text        NOT NULL,
    stream_seq     bigint,                -- sequence in the AGENTBUS_EVENTS stream
    schema_version int,
    occurred_at    timestamptz NOT NULL,
    received_at    timestamptz NOT NULL DEFAULT now(),
    payload        jsonb       NOT NULL
);

-- A task's history in stream order.
CREATE INDEX events_task_seq ON events (task_id, stream_seq);

-- One row per task: the fold of its events, what task_history answers with.
CREATE TABLE tasks (
    task_id    text PRIMARY KEY,
    goal       text        NOT NULL DEFAULT '',
    status     text        NOT NULL,
    plan       jsonb       NOT NULL DEFAULT '{}',  -- {"revision": n, "steps": [PlanStep...]}
    steps      jsonb       NOT NULL DEFAULT '[]',  -- [{id, title, status, attempt, output, error}]
    answer     text,
    error      text,
    usage      jsonb       NOT NULL DEFAULT '{}',  -- contracts Usage: {"by_model": {...}}
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    last_seq   bigint      NOT NULL DEFAULT 0     -- newest stream_seq folded in
);
