-- The journal sequence number applied to this database: journal records up
-- to it are in the tables above (written in the same transaction), so a
-- replay after a crash skips them. One row.
CREATE TABLE journal_state (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    applied_seq INTEGER NOT NULL
);
INSERT INTO journal_state (id, applied_seq) VALUES (1, 0);
