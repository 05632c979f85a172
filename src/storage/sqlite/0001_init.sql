-- bizsignal SQLite schema, version 1. Additive changes only: new migrations
-- add tables, columns or indexes; nothing is dropped or renamed.

-- One row per business fact (and one per signal, kind span/log/event).
-- Append-only; event_id is deterministic, so a replay is ignored.
CREATE TABLE business_events (
    event_id   TEXT PRIMARY KEY,
    signal_id  TEXT NOT NULL,
    process    TEXT NOT NULL,
    run_id     TEXT NOT NULL,
    time_ns    INTEGER NOT NULL,
    kind       TEXT NOT NULL,
    name       TEXT NOT NULL,
    value      REAL,
    text       TEXT NOT NULL,
    payload    TEXT NOT NULL,
    service    TEXT NOT NULL,
    trace_id   TEXT NOT NULL,
    span_id    TEXT NOT NULL,
    attributes TEXT NOT NULL, -- JSON object
    resource   TEXT NOT NULL  -- JSON object
);
CREATE INDEX business_events_by_run ON business_events (process, run_id, time_ns);
CREATE INDEX business_events_by_time ON business_events (process, time_ns);

-- The current state of each run. The queryable columns are copies of fields
-- of `state` (the full run as JSON), kept for filtering and ordering.
CREATE TABLE process_runs (
    process          TEXT NOT NULL,
    run_id           TEXT NOT NULL,
    status           TEXT NOT NULL,
    started_at_ns    INTEGER NOT NULL,
    last_seen_at_ns  INTEGER NOT NULL,
    ended_at_ns      INTEGER,
    state            TEXT NOT NULL,
    PRIMARY KEY (process, run_id)
);
CREATE INDEX process_runs_newest ON process_runs (started_at_ns DESC, process DESC, run_id DESC);
CREATE INDEX process_runs_by_status ON process_runs (status);

-- Runs first seen by trace id that later named themselves with business.run.id.
CREATE TABLE run_aliases (
    process  TEXT NOT NULL,
    trace_id TEXT NOT NULL,
    run_id   TEXT NOT NULL,
    PRIMARY KEY (process, trace_id)
);

-- Violations that belong to a process rather than a run (a deadline passed
-- with no run at all).
CREATE TABLE process_violations (
    process TEXT NOT NULL,
    rule    TEXT NOT NULL,
    message TEXT NOT NULL,
    at_ns   INTEGER NOT NULL
);
CREATE INDEX process_violations_by_process ON process_violations (process, at_ns);
