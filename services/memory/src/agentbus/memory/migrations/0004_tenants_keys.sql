-- 0004: tenants and API keys.
-- Applied once, in a transaction, by agentbus.memory.adapters.db.migrate.

-- The API keys of the HTTP gateway. The key itself is never stored (nor sent on the
-- bus): only its SHA-256 (hex) and its first characters, to recognise it by. A tenant
-- is a name; it exists while it has keys or tasks.
CREATE TABLE api_keys (
    key_id     text PRIMARY KEY,
    tenant     text        NOT NULL,
    key_hash   text        NOT NULL UNIQUE,  -- what a caller's key is looked up by
    prefix     text        NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz                   -- NULL: the key works
);

-- A tenant's keys, oldest first.
CREATE INDEX api_keys_tenant ON api_keys (tenant, created_at);

-- The tenant a task was submitted for (TaskSubmitted.tenant); '' for tasks submitted on
-- the bus directly, and for every task stored before tenants existed.
ALTER TABLE tasks ADD COLUMN tenant text NOT NULL DEFAULT '';

-- A tenant's tasks by submission time (tasks list, costs).
CREATE INDEX tasks_tenant_created_at ON tasks (tenant, created_at);
