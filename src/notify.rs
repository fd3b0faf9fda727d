//! systemd readiness (`Type=notify`): READY once listening, RELOADING/READY
//! around a SIGHUP reload, STOPPING when the drain begins, STATUS lines for
//! `systemctl status`. Without `NOTIFY_SOCKET` every call does nothing.

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(error) = sd_notify::notify(states) {
        tracing::warn!(%error, "could not notify systemd");
    }
}

/// The gateway is listening.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A reload begins (systemd wants the monotonic time with it).
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now, NotifyState::Status("reloading")]),
        Err(error) => tracing::warn!(%error, "no monotonic clock for RELOADING=1"),
    }
}

/// The drain begins.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("draining")]);
}
