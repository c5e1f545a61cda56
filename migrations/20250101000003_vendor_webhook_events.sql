-- Vendor webhooks stored raw, exactly once per idempotency key (Nats-Msg-Id or body SHA-256).
CREATE TABLE IF NOT EXISTS vendor_webhook_events (
    id              BIGSERIAL PRIMARY KEY,
    vendor          TEXT        NOT NULL,
    idempotency_key TEXT        NOT NULL UNIQUE,
    user_id         TEXT        NULL,
    payload         JSONB       NOT NULL,
    received_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    source_stream   TEXT,
    source_seq      BIGINT,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS vendor_webhook_events_user_id_idx ON vendor_webhook_events (user_id);
