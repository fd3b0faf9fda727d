//! Process signals: SIGTERM/SIGINT start a drain (a second one exits at once);
//! SIGHUP reloads the config and keys files.

use std::sync::Arc;

use tokio::signal::unix::{SignalKind, signal};

use crate::state::Shared;

/// Exit code used when a second signal cuts the drain short.
pub const EXIT_FORCED: i32 = 130;

/// Resolves on the first SIGTERM or SIGINT. From then on, another SIGTERM or
/// SIGINT ends the process at once, whatever is still draining.
pub async fn first_stop_signal() {
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; only a kill will stop this process");
        return std::future::pending().await;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = name, "shutdown requested; send it again to exit at once");
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        tracing::warn!("second signal: exiting without waiting for the drain");
        std::process::exit(EXIT_FORCED);
    });
}

/// Reloads on every SIGHUP until the process ends. A refused reload keeps the
/// running config; `Shared::reload` logs why.
pub async fn reload_on_sighup(shared: Arc<Shared>) {
    let Ok(mut hangup) = signal(SignalKind::hangup()) else {
        tracing::error!("cannot install the SIGHUP handler; reload with POST /admin/reload");
        return;
    };
    while hangup.recv().await.is_some() {
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
