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

-- The associations that brought instances of a study while it was
-- receiving, for study.after_release_s: such a study is complete that long
-- after the last of them was released, none being open. Written in the
-- instance's own transaction; the release is committed (fsynced) before the
-- A-RELEASE-RP goes, so a kill -9 after it never loses it. Rows of a study
-- go when it becomes stable (or is purged).
CREATE TABLE IF NOT EXISTS study_associations (
    study_uid       TEXT NOT NULL,
    assoc           TEXT NOT NULL,   -- the node run's token and the association's number
    opened          REAL NOT NULL,   -- its first instance of the study
    ended           REAL,            -- released or ended otherwise; NULL while open
    released        INTEGER NOT NULL DEFAULT 0,  -- 1: A-RELEASE; 0: abort, lost link, node restart
    PRIMARY KEY (study_uid, assoc)
);
CREATE INDEX IF NOT EXISTS study_associations_assoc ON study_associations(assoc, ended);

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

# The sonographers' reference of each study that holds an SR, recorded
# beside the models' results by the agreement job (echonode.agreement.record),
# and the figures derived from them. Additive like the rest of the schema.
# No patient identifier: UIDs, measured values, reasons in words, the cart.
AGREEMENT_SCHEMA = """
-- One row per study whose SRs were read: the measurement SR whose values
-- count (NULL when none gives one, with the reason), the values used
-- (JSON, labels.csv's column names), the SRs passed over and why (JSON),
-- and the cart that acquired the images. A later SR rewrites the row.
CREATE TABLE IF NOT EXISTS study_references (
    study_uid       TEXT PRIMARY KEY,
    sr_sop_uid      TEXT,
    reason          TEXT,
    srs             INTEGER NOT NULL,
    not_used        TEXT NOT NULL,
    measured        TEXT NOT NULL,
    rules           TEXT NOT NULL,
    manufacturer    TEXT,
    model_name      TEXT,
    station_name    TEXT,
    recorded        REAL NOT NULL
);
-- The reference label of each task the rules decide (1, 0, NULL: undecided) and why.
CREATE TABLE IF NOT EXISTS reference_labels (
    study_uid       TEXT NOT NULL,
    task            TEXT NOT NULL,
    label           INTEGER,
    reason          TEXT NOT NULL,
    PRIMARY KEY (study_uid, task)
);
-- Studies with an SR received since their reference was last read. The
-- triggers fill it in the transaction that records the SR (no SR is missed
-- by a crash between the two); the agreement job empties it, row by row,
-- only when ``seq`` is still the one it read (an SR that came meanwhile
-- leaves the row for the next pass).
CREATE TABLE IF NOT EXISTS references_due (
    study_uid       TEXT PRIMARY KEY,
    since           REAL NOT NULL,
    seq             INTEGER NOT NULL DEFAULT 0
);
CREATE TRIGGER IF NOT EXISTS references_due_insert AFTER INSERT ON instances
WHEN substr(NEW.sop_class_uid, 1, 27) = '1.2.840.10008.5.1.4.1.1.88.' BEGIN
    INSERT INTO references_due (study_uid, since) VALUES (NEW.study_uid, NEW.received)
    ON CONFLICT(study_uid) DO UPDATE SET since = excluded.since, seq = seq + 1;
END;
CREATE TRIGGER IF NOT EXISTS references_due_update AFTER UPDATE OF received, path ON instances
WHEN substr(NEW.sop_class_uid, 1, 27) = '1.2.840.10008.5.1.4.1.1.88.' BEGIN
    INSERT INTO references_due (study_uid, since) VALUES (NEW.study_uid, NEW.received)
    ON CONFLICT(study_uid) DO UPDATE SET since = excluded.since, seq = seq + 1;
END;
-- What `status`, the metrics and the status page show: one JSON document the
-- agreement job writes, so that none of them reads every result.
CREATE TABLE IF NOT EXISTS agreement_summary (
    id              INTEGER PRIMARY KEY CHECK (id = 1),
    computed        REAL NOT NULL,
    document        TEXT NOT NULL
);
-- Once-only steps run at open (name -> when), e.g. queueing the SRs a
-- journal held before the triggers above existed.
CREATE TABLE IF NOT EXISTS journal_marks (
    name            TEXT PRIMARY KEY,
    at              REAL NOT NULL
);
"""

#: The SR storage classes' common prefix, as the triggers above spell it (27 characters).
SR_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."

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
    # When the study last became complete (stable) and was last claimed by
    # a worker: with last_received, reports.created and outbox.sent_at, the
    # stages of a study's latency (bench/latency.py).
    ("studies", "stable_at", "REAL"),
    ("studies", "claimed_at", "REAL"),
)

#: A study's last activity (last instance received or last state change), as
#: indexed by ``studies_active``; ``s`` is the studies table's alias.
ACTIVE = "MAX(s.last_received, s.updated)"


#: Prefixes of the storage classes that carry no image: structured reports (KOS and CAD SR
#: among them), encapsulated documents (a report's PDF), presentation states, waveforms (an
#: ECG) and raw data, registrations and segmentations. A study that holds only these has
#: nothing to analyse yet; the first object of another class is its first image.
DOCUMENT_CLASS_PREFIXES = (
    SR_CLASS_PREFIX,
    "1.2.840.10008.5.1.4.1.1.104.",
    "1.2.840.10008.5.1.4.1.1.11.",
    "1.2.840.10008.5.1.4.1.1.9.",
    "1.2.840.10008.5.1.4.1.1.66.",
)
#: Raw Data Storage itself (its relatives are under its prefix).
_RAW_DATA = "1.2.840.10008.5.1.4.1.1.66"


def is_document_class(sop_class_uid: str) -> bool:
    """Whether a storage class carries no image (:data:`DOCUMENT_CLASS_PREFIXES`)."""
    return sop_class_uid == _RAW_DATA or sop_class_uid.startswith(DOCUMENT_CLASS_PREFIXES)


def document_class_sql(column: str) -> str:
    """SQL true when the SOP Class UID in ``column`` is a document class (literals, no parameters)."""
    tests = [f"substr({column}, 1, {len(p)}) = '{p}'" for p in DOCUMENT_CLASS_PREFIXES]
    return "(" + " OR ".join([*tests, f"{column} = '{_RAW_DATA}'"]) + ")"


# Run after the other schemas (connection.py). A study's first image re-reads a reference read before it: the Patient ID
# check and the cart come from the images, and an SR forwarded ahead of its
# loops was read without them. The NOT EXISTS comes first: while a study's
# images arrive it stops at the first earlier image, where an EXISTS on the
# SRs would walk the whole study on every insert until one came. (An earlier
# build of this trigger, keyed on "not an SR", is replaced.)
FIRST_OBJECT_TRIGGER = f"""DROP TRIGGER IF EXISTS references_due_first_image;
CREATE TRIGGER IF NOT EXISTS references_due_first_object AFTER INSERT ON instances
WHEN NOT {document_class_sql("NEW.sop_class_uid")}
 AND NOT EXISTS (SELECT 1 FROM instances i WHERE i.study_uid = NEW.study_uid AND i.sop_uid != NEW.sop_uid
                 AND NOT {document_class_sql("i.sop_class_uid")})
 AND EXISTS (SELECT 1 FROM instances i WHERE i.study_uid = NEW.study_uid
             AND substr(i.sop_class_uid, 1, {len(SR_CLASS_PREFIX)}) = '{SR_CLASS_PREFIX}') BEGIN
    INSERT INTO references_due (study_uid, since) VALUES (NEW.study_uid, NEW.received)
    ON CONFLICT(study_uid) DO UPDATE SET since = excluded.since, seq = seq + 1;
END;
"""
