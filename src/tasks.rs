//! Background tasks. Every task sluice spawns besides its connections (key
//! checks, idle-pool sweepers, the SIGHUP handler, store and cluster work) is
//! spawned here: tracked, so shutdown can wait for it, and handed the stop
//! signal, so a task that would run forever ends when the drain begins.
//! [`loops`] runs the event loops that may serve client connections instead
//! of the runtime's workers. A task is spawned where its spawner runs: work a
//! request starts (a cache write, a key check, an idle-pool sweeper) lives
//! on that request's loop, so the loops stop after these tasks.

pub mod loops;

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The process's background tasks and their stop signal; cheap to clone.
#[derive(Clone, Default)]
pub struct Tasks {
    tracker: TaskTracker,
    stop: CancellationToken,
}

impl std::fmt::Debug for Tasks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tasks").field("running", &self.tracker.len()).finish()
    }
}

impl Tasks {
    /// Spawns a tracked task on the current runtime; outside a runtime (a
    /// snapshot built by a CLI command) nothing is spawned.
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        if tokio::runtime::Handle::try_current().is_ok() {
            self.tracker.spawn(task);
        }
    }

    /// Resolves when shutdown begins: loops select on it to end.
    pub async fn stopped(&self) {
        self.stop.cancelled().await;
    }

    /// Whether shutdown has begun.
    pub fn is_stopping(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Tasks running now.
    pub fn running(&self) -> usize {
        self.tracker.len()
    }

    /// Tells every task to stop and waits up to `grace` for them; true when
    /// all ended in time.
    pub async fn shutdown(&self, grace: Duration) -> bool {
        self.stop.cancel();
        self.tracker.close();
        let done = tokio::time::timeout(grace, self.tracker.wait()).await.is_ok();
        if !done {
            tracing::warn!(running = self.tracker.len(), "background tasks still running after the grace period");
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shutdown_stops_and_waits_for_every_task() {
        let tasks = Tasks::default();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let forever = tasks.clone();
        tasks.spawn(async move {
            forever.stopped().await;
            let _ = done_tx.send(());
        });
        assert_eq!(tasks.running(), 1);
        assert!(tasks.shutdown(Duration::from_secs(5)).await);
        assert_eq!(tasks.running(), 0);
        assert!(done_rx.await.is_ok(), "the task saw the stop signal");
    }
}
