-- Sleep records, one per user and night (date); the newest captured_at wins.
-- captured_at_defaulted is true when the event had no capturedAt and processing time was used.
CREATE TABLE IF NOT EXISTS sleep_data (
    id                    BIGSERIAL PRIMARY KEY,
    user_id               TEXT        NOT NULL,
    date                  DATE        NOT NULL,
    duration_minutes      INTEGER     NOT NULL CHECK (duration_minutes BETWEEN 0 AND 1440),
    quality_score         INTEGER     NULL CHECK (quality_score BETWEEN 0 AND 100),
    vendor                TEXT        NOT NULL DEFAULT 'unknown',
    captured_at           TIMESTAMPTZ NOT NULL,
    captured_at_defaulted BOOLEAN     NOT NULL DEFAULT false,
    source_stream         TEXT,
    source_seq            BIGINT,
    created_at            TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at            TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT sleep_data_user_id_date_key UNIQUE (user_id, date)
);
