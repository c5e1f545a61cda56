-- HRV readings, one per user and day; the newest captured_at wins.
CREATE TABLE IF NOT EXISTS hrv_data (
    id            BIGSERIAL PRIMARY KEY,
    user_id       TEXT             NOT NULL,
    date          DATE             NOT NULL,
    rmssd         DOUBLE PRECISION NOT NULL,
    ln_rmssd      DOUBLE PRECISION NOT NULL,
    vendor        TEXT             NOT NULL DEFAULT 'unknown',
    captured_at   TIMESTAMPTZ      NOT NULL,
    source_stream TEXT,
    source_seq    BIGINT,
    created_at    TIMESTAMPTZ      NOT NULL DEFAULT now(),
    updated_at    TIMESTAMPTZ      NOT NULL DEFAULT now(),
    CONSTRAINT hrv_data_user_id_date_key UNIQUE (user_id, date)
);
