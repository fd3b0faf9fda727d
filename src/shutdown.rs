//! Process signals: SIGTERM/SIGINT start a drain (a second one exits at once).

use tokio::signal::unix::{SignalKind, signal};

/// Exit code used when a second signal cuts the drain short.
pub const EXIT_FORCED: i32 = 130;

/// Resolves on the first SIGTERM or SIGINT. From then on, another SIGTERM or
/// SIGINT ends the process at once, whatever is still draining.
pub async fn first_stop_signal() {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; only a kill will stop this process");
        return std::future::pending().await;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(
        signal = name,
        "shutdown requested; send it again to exit at once"
    );
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        tracing::warn!("second signal: exiting without waiting for the drain");
        std::process::exit(EXIT_FORCED);
    });
}
