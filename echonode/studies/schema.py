"""The journal's SQLite schema: tables, indexes, triggers, and the columns added since a table's first release."""

from __future__ import annotations

SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study_uid       TEXT PRIMARY KEY,
    state           TEXT NOT NULL,
    reason          TEXT,
    first_received  REAL NOT NULL,
    last_received   REAL NOT NULL,
    updated         REAL NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    -- bumps whenever the study is (re)claimed or re-opened: a worker whose
    -- claim is stale must not write results
    generation      INTEGER NOT NULL DEFAULT 0,
    worker_pid      INTEGER
);
CREATE INDEX IF NOT EXISTS studies_state ON studies(state);
-- A study's last activity: retention walks it oldest first, `status` lists
-- the most recent. Queries must spell the expression exactly as here
-- (see ACTIVE) for SQLite to use the index.
CREATE INDEX IF NOT EXISTS studies_active ON studies(MAX(last_received, updated), study_uid);

CREATE TABLE IF NOT EXISTS instances (
    sop_uid         TEXT PRIMARY KEY,
    study_uid       TEXT NOT NULL REFERENCES studies(study_uid),
    series_uid      TEXT NOT NULL,
    sop_class_uid   TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    path            TEXT NOT NULL,
    size            INTEGER NOT NULL,
    received        REAL NOT NULL,
    calling_ae      TEXT
);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_uid);

CREATE TABLE IF NOT EXISTS results (
    id              INTEGER PRIMARY KEY,
    study_uid       TEXT NOT NULL,
    model_set       TEXT NOT NULL,
    task            TEXT NOT NULL,
    bundle_name     TEXT NOT NULL,
    bundle_version  TEXT NOT NULL,
    device_uid      TEXT NOT NULL,
    probability     REAL NOT NULL,
    positive        INTEGER NOT NULL,
    threshold       REAL NOT NULL,
    n_videos        INTEGER NOT NULL,
    detail          TEXT NOT NULL,
    created         REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS results_study ON results(study_uid);

CREATE TABLE IF NOT EXISTS reports (
    sr_sop_uid      TEXT PRIMARY KEY,
    study_uid       TEXT NOT NULL,
    model_set       TEXT NOT NULL,
    series_uid      TEXT NOT NULL,
    sop_class_uid   TEXT NOT NULL,
    path            TEXT NOT NULL,
    supersedes      TEXT,
    created         REAL NOT NULL,
    UNIQUE (study_uid, model_set)
);

CREATE TABLE IF NOT EXISTS outbox (
    id              INTEGER PRIMARY KEY,
    sr_sop_uid      TEXT NOT NULL REFERENCES reports(sr_sop_uid),
    study_uid       TEXT NOT NULL,
    destination     TEXT NOT NULL,
    state           TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt    REAL NOT NULL,
    last_error      TEXT,
    created         REAL NOT NULL,
    sent_at         REAL,
    discarded_at    REAL,
    UNIQUE (sr_sop_uid, destination)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(state, next_attempt);
-- "does this study still owe an SR": retention, purge_study, _delivery_state.
CREATE INDEX IF NOT EXISTS outbox_study ON outbox(study_uid, state);

-- The bytes and number of recorded instances, one row kept by the triggers
-- below, so that retention and every metrics scrape read one row instead of
-- summing every instance. Filled once, from the instances, by
-- Journal._count_stored (after the triggers exist, so no write is missed).
-- An earlier echonode (a roll back) keeps it right: the triggers are the
-- file's, they fire for any writer.
CREATE TABLE IF NOT EXISTS stored_totals (
    id              INTEGER PRIMARY KEY CHECK (id = 1),
    bytes           INTEGER NOT NULL,
    instances       INTEGER NOT NULL
);
CREATE TRIGGER IF NOT EXISTS stored_totals_insert AFTER INSERT ON instances BEGIN
    UPDATE stored_totals SET bytes = bytes + NEW.size, instances = instances + 1 WHERE id = 1;
END;
CREATE TRIGGER IF NOT EXISTS stored_totals_delete AFTER DELETE ON instances BEGIN
    UPDATE stored_totals SET bytes = bytes - OLD.size, instances = instances - 1 WHERE id = 1;
END;
CREATE TRIGGER IF NOT EXISTS stored_totals_update AFTER UPDATE OF size ON instances BEGIN
    UPDATE stored_totals SET bytes = bytes - OLD.size + NEW.size WHERE id = 1;
END;
"""

# Indexes the status page reads through (Journal.page_*): each of its
# lists and figures is a seek or a range of one of these, so the page costs
# the same on a journal of 100,000 studies as on one of ten. Additive like
# the rest of the schema.
STATUS_PAGE_SCHEMA = """
-- The most recent studies of one state: a seek per state, then LIMIT.
CREATE INDEX IF NOT EXISTS studies_state_active ON studies(state, MAX(last_received, updated), study_uid);
-- Instances received per hour over the last hours: a range, not a scan.
CREATE INDEX IF NOT EXISTS instances_received ON instances(received);
"""

#: Columns added to a table after its first release, as (table, column,
#: declaration): CREATE TABLE IF NOT EXISTS leaves an older journal's table
#: as it is, so :meth:`Journal._add_columns` adds these at open. Nullable, so
#: an earlier echonode (a roll back) inserts and reads rows as before.
ADDED_COLUMNS = (
    ("outbox", "discarded_at", "REAL"),
    # What the destination was sent, set with ``sent``: the SR's own class
    # and UID, or the class it fell back to there and the UID derived for it.
    ("outbox", "sent_sop_class_uid", "TEXT"),
    ("outbox", "sent_sop_uid", "TEXT"),
)

#: A study's last activity (last instance received or last state change), as
#: indexed by ``studies_active``; ``s`` is the studies table's alias.
ACTIVE = "MAX(s.last_received, s.updated)"
