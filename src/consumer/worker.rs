//! What one consumer's loops share: the process's handles and the consumer's own config.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConsumerConfig};
use crate::health::Health;
use crate::metrics::Metrics;

/// Everything a consumer loop shares with the rest of the process.
#[derive(Clone)]
pub struct Shared {
    pub config: Arc<Config>,
    pub js: jetstream::Context,
    pub pool: PgPool,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
}

/// One consumer: its loops (one per binding, see `binding`), their intake (`intake`) and
/// their batches (`batch`) are methods of it.
#[derive(Clone)]
pub struct Worker {
    pub(super) shared: Shared,
    pub(super) cc: ConsumerConfig,
}

impl Worker {
    pub fn new(shared: Shared, cc: ConsumerConfig) -> Worker {
        Worker { shared, cc }
    }
}

/// Sleeps unless cancelled first; returns false when cancelled.
pub async fn sleep_or_cancel(d: Duration, token: &CancellationToken) -> bool {
    tokio::select! {
        _ = token.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}
