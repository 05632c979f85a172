-- One row per signal instead of one per business fact: what a signal's rows
-- share (ids, service, attributes, resource) is stored once and its rows
-- (the signal itself and each fact) as a JSON array
-- `[[event_id, kind, name, time_ns, value, text, payload], ...]`.
-- A signal with four facts used to be five rows with five copies of its
-- attribute JSON and fifteen index entries; now it is one row and one index
-- entry (docs/benchmarks.md). `business_events` stays readable as a view
-- with the same columns as before.
CREATE TABLE business_signals (
    signal_id  TEXT NOT NULL,
    process    TEXT NOT NULL,
    run_id     TEXT NOT NULL,
    time_ns    INTEGER NOT NULL, -- earliest row time
    service    TEXT NOT NULL,
    trace_id   TEXT NOT NULL,
    span_id    TEXT NOT NULL,
    attributes TEXT NOT NULL,    -- JSON object
    resource   TEXT NOT NULL,    -- JSON object
    rows       TEXT NOT NULL     -- JSON array, see above
);
-- Unique, so re-writing a batch (a replay) inserts nothing twice.
CREATE UNIQUE INDEX business_signals_by_run ON business_signals (process, run_id, time_ns, signal_id);

INSERT INTO business_signals (signal_id, process, run_id, time_ns, service, trace_id, span_id, attributes, resource, rows)
SELECT signal_id, process, run_id, MIN(time_ns), service, trace_id, span_id, attributes, resource,
       json_group_array(json_array(event_id, kind, name, time_ns, value, text, payload))
FROM business_events
GROUP BY signal_id, process, run_id, service, trace_id, span_id, attributes, resource;

DROP TABLE business_events;

CREATE VIEW business_events AS
SELECT r.value ->> 0 AS event_id, s.signal_id, s.process, s.run_id, r.value ->> 3 AS time_ns,
       r.value ->> 1 AS kind, r.value ->> 2 AS name, r.value ->> 4 AS value, r.value ->> 5 AS text,
       r.value ->> 6 AS payload, s.service, s.trace_id, s.span_id, s.attributes, s.resource
FROM business_signals s, json_each(s.rows) r;
