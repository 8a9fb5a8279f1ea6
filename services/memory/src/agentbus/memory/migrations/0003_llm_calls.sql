-- 0003: one row per LLM call (llm.called events), and budget pauses in the projection.
-- Applied once, in a transaction, by agentbus.memory.adapters.db.migrate.

-- Every LLM call of every task, planner and executors alike: the complete record of
-- spend (lifecycle events report usage only when a plan or a step attempt is done).
-- Written in the same transaction as the event's row in events; event_id is unique,
-- so a redelivered event is stored once.
CREATE TABLE llm_calls (
    event_id          text PRIMARY KEY,
    task_id           text             NOT NULL,
    step_id           text             NOT NULL DEFAULT '',  -- '' for the planner's calls
    role              text             NOT NULL,             -- planner or executor
    conversation      text             NOT NULL DEFAULT '',
    model             text             NOT NULL,
    prompt_tokens     bigint           NOT NULL DEFAULT 0,
    completion_tokens bigint           NOT NULL DEFAULT 0,
    cached_tokens     bigint           NOT NULL DEFAULT 0,
    cost_usd          double precision NOT NULL DEFAULT 0,
    reserved_tokens   bigint           NOT NULL DEFAULT 0,   -- worst case held before the call
    reserved_cost_usd double precision NOT NULL DEFAULT 0,
    duration_ms       double precision NOT NULL DEFAULT 0,
    occurred_at       timestamptz      NOT NULL
);

-- Costs by task (and per step within a task).
CREATE INDEX llm_calls_task_step ON llm_calls (task_id, step_id);

-- Calls that an older memory stored as an event of an unknown type: copy them over, so
-- a task's calls are all here or none are. Payloads are read defensively (a value of the
-- wrong type counts as absent; CASE, unlike AND, checks the type before the cast): a
-- malformed old event must not stop the migration.
CREATE FUNCTION pg_temp.count_of(v jsonb) RETURNS bigint LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN jsonb_typeof(v) IS DISTINCT FROM 'number' THEN 0
                WHEN v::text::numeric BETWEEN 0 AND 9000000000000000000
                THEN trunc(v::text::numeric)::bigint ELSE 0 END
$$;
CREATE FUNCTION pg_temp.amount_of(v jsonb) RETURNS double precision LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN jsonb_typeof(v) IS DISTINCT FROM 'number' THEN 0
                WHEN v::text::numeric BETWEEN 0 AND 1e300 THEN v::text::double precision
                ELSE 0 END
$$;
CREATE FUNCTION pg_temp.text_of(v jsonb) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN jsonb_typeof(v) = 'string' THEN v #>> '{}' ELSE '' END
$$;

INSERT INTO llm_calls (event_id, task_id, step_id, role, conversation, model,
                       prompt_tokens, completion_tokens, cached_tokens, cost_usd,
                       reserved_tokens, reserved_cost_usd, duration_ms, occurred_at)
SELECT event_id, task_id,
       pg_temp.text_of(payload->'step_id'),
       pg_temp.text_of(payload->'role'),
       pg_temp.text_of(payload->'conversation'),
       pg_temp.text_of(payload->'model'),
       pg_temp.count_of(payload->'usage'->'prompt_tokens'),
       pg_temp.count_of(payload->'usage'->'completion_tokens'),
       pg_temp.count_of(payload->'usage'->'cached_tokens'),
       pg_temp.amount_of(payload->'usage'->'cost_usd'),
       pg_temp.count_of(payload->'reserved_tokens'),
       pg_temp.amount_of(payload->'reserved_cost_usd'),
       pg_temp.amount_of(payload->'duration_ms'),
       occurred_at
FROM events
WHERE type = 'llm.called'
  AND jsonb_typeof(payload->'model') = 'string'
  AND jsonb_typeof(payload->'usage') = 'object'
ON CONFLICT (event_id) DO NOTHING;

DROP FUNCTION pg_temp.count_of(jsonb);
DROP FUNCTION pg_temp.amount_of(jsonb);
DROP FUNCTION pg_temp.text_of(jsonb);

-- The projection's budget pauses (see TaskProjection): approvals seen, and the highest
-- approval round in which a budget ran out with action pause (NULL: never).
ALTER TABLE tasks
    ADD COLUMN approvals    int NOT NULL DEFAULT 0,
    ADD COLUMN paused_round int;
