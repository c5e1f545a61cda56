-- Per-field newest-wins (docs/CONTRACT.md). Each optional field keeps the order key of the event
-- it came from (time, stream, sequence), so an optional field missing from the newest event
-- keeps the value of the newest event that had it, whatever the order of arrival. Every row has
-- a version, increased by each stored change and published with the normalized event;
-- changed_tx names the transaction of the last stored change (the upsert's RETURNING compares
-- it with the current one to tell a change from bookkeeping).
ALTER TABLE hrv_data
    ADD COLUMN IF NOT EXISTS readiness_score DOUBLE PRECISION NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS vendor_at       TIMESTAMPTZ NULL,
    ADD COLUMN IF NOT EXISTS vendor_stream   TEXT        NULL,
    ADD COLUMN IF NOT EXISTS vendor_seq      BIGINT      NULL,
    ADD COLUMN IF NOT EXISTS version         BIGINT      NOT NULL DEFAULT 1,
    ADD COLUMN IF NOT EXISTS changed_tx      XID8        NULL;

ALTER TABLE sleep_data
    ADD COLUMN IF NOT EXISTS vendor_at      TIMESTAMPTZ NULL,
    ADD COLUMN IF NOT EXISTS vendor_stream  TEXT        NULL,
    ADD COLUMN IF NOT EXISTS vendor_seq     BIGINT      NULL,
    ADD COLUMN IF NOT EXISTS quality_at     TIMESTAMPTZ NULL,
    ADD COLUMN IF NOT EXISTS quality_stream TEXT        NULL,
    ADD COLUMN IF NOT EXISTS quality_seq    BIGINT      NULL,
    ADD COLUMN IF NOT EXISTS version        BIGINT      NOT NULL DEFAULT 1,
    ADD COLUMN IF NOT EXISTS changed_tx     XID8        NULL;

-- Existing rows stay valid: their position is made comparable, and a stored vendor or quality
-- counts as carried by the row's own event (a vendor of 'unknown' as never carried, so any
-- event that names one fills it).
UPDATE hrv_data SET source_stream = COALESCE(source_stream, ''), source_seq = COALESCE(source_seq, 0)
    WHERE source_stream IS NULL OR source_seq IS NULL;
UPDATE hrv_data SET vendor_at = captured_at, vendor_stream = source_stream, vendor_seq = source_seq
    WHERE vendor <> 'unknown' AND vendor_at IS NULL;
UPDATE sleep_data SET source_stream = COALESCE(source_stream, ''), source_seq = COALESCE(source_seq, 0)
    WHERE source_stream IS NULL OR source_seq IS NULL;
UPDATE sleep_data SET vendor_at = captured_at, vendor_stream = source_stream, vendor_seq = source_seq
    WHERE vendor <> 'unknown' AND vendor_at IS NULL;
UPDATE sleep_data SET quality_at = captured_at, quality_stream = source_stream, quality_seq = source_seq
    WHERE quality_score IS NOT NULL AND quality_at IS NULL;
