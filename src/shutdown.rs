//! Process signals: SIGTERM/SIGINT start a drain (a second one exits at once);
//! SIGHUP reloads the config and keys files; SIGUSR1 reopens the request log
//! (after logrotate moved it). Both handlers are installed when
//! their function is called, not when its future is first polled: a signal
//! sent the moment systemd hears READY must find its handler (SIGHUP's default
//! action would end the process).

use std::future::Future;
use std::sync::Arc;

use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::state::Shared;
use crate::tasks::Tasks;

/// Exit code used when a second signal cuts the drain short.
pub const EXIT_FORCED: i32 = 130;

/// Resolves on the first SIGTERM or SIGINT. From then on, another SIGTERM or
/// SIGINT ends the process at once, whatever is still draining (a task
/// tracked by `tasks`, which ends with them).
pub fn first_stop_signal(tasks: Tasks) -> impl Future<Output = ()> {
    let handlers = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()));
    async move { stop_on(handlers, tasks).await }
}

async fn stop_on(handlers: (std::io::Result<Signal>, std::io::Result<Signal>), tasks: Tasks) {
    let (Ok(mut term), Ok(mut int)) = handlers else {
        tracing::error!("cannot install signal handlers; only a kill will stop this process");
        return std::future::pending().await;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = name, "shutdown requested; send it again to exit at once");
    let watching = tasks.clone();
    tasks.spawn(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
            () = watching.stopped() => return,
        }
        tracing::warn!("second signal: exiting without waiting for the drain");
        std::process::exit(EXIT_FORCED);
    });
}

/// Reloads on every SIGHUP until shutdown begins. A refused reload keeps the
/// running config; `Shared::reload` logs why.
pub fn reload_on_sighup(shared: Arc<Shared>) -> impl Future<Output = ()> {
    let handler = signal(SignalKind::hangup());
    async move { reload_on(handler, shared).await }
}

async fn reload_on(handler: std::io::Result<Signal>, shared: Arc<Shared>) {
    let Ok(mut hangup) = handler else {
        tracing::error!("cannot install the SIGHUP handler; reload with POST /admin/reload");
        return;
    };
    loop {
        tokio::select! {
            received = hangup.recv() => if received.is_none() { return },
            () = shared.tasks.stopped() => return,
        }
        tracing::info!("SIGHUP: reloading");
        crate::notify::reloading();
        let status = match shared.reload() {
            Ok(summary) => {
                format!("reloaded: {} keys ({} added, {} removed)", summary.keys, summary.added, summary.removed)
            }
            Err(reason) => format!("reload refused, running config kept: {reason}"),
        };
        crate::notify::ready(&status);
    }
}

/// Reopens the request log on every SIGUSR1 until shutdown begins.
pub fn reopen_log_on_sigusr1(shared: Arc<Shared>) -> impl Future<Output = ()> {
    let handler = signal(SignalKind::user_defined1());
    async move {
        let Ok(mut usr1) = handler else {
            tracing::error!("cannot install the SIGUSR1 handler; the request log follows a moved file within a second");
            return;
        };
        loop {
            tokio::select! {
                received = usr1.recv() => if received.is_none() { return },
                () = shared.tasks.stopped() => return,
            }
            tracing::info!("SIGUSR1: reopening the request log");
            shared.telemetry.reopen_log();
        }
    }
}
