//! Operations: the systemd unit, the notify protocol of the real binary, and the
//! install script.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use sluice::mock::MockServer;

use crate::binary::signal;
use crate::support::{Opts, config_text};

const BIN: &str = env!("CARGO_BIN_EXE_sluice");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

#[test]
fn systemd_unit_verifies() {
    let unit = std::fs::read_to_string(Path::new(ROOT).join("systemd/sluice.service")).unwrap();
    for directive in [
        "Type=notify",
        "ExecStart=/usr/local/bin/sluice serve",
        "ExecReload=/usr/local/bin/sluice check -c /etc/sluice/sluice.toml\nExecReload=/bin/kill -HUP $MAINPID",
        "RestartPreventExitStatus=2",
        "LimitNOFILE=65536",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "ReadWritePaths=/var/log/sluice /var/lib/sluice",
        "CapabilityBoundingSet=\n",
    ] {
        assert!(unit.contains(directive), "unit lacks {directive:?}");
    }
    let stop: u64 = unit.lines().find_map(|l| l.strip_prefix("TimeoutStopSec=")).unwrap().parse().unwrap();
    assert!(stop > sluice::config::server::DEFAULT_SHUTDOWN_GRACE.as_secs(), "TimeoutStopSec must outlast the drain");

    // A bad config must stop the unit, not restart-loop it: only the main
    // process's exit status is matched by RestartPreventExitStatus.
    assert!(!unit.contains("ExecStartPre="), "a check in ExecStartPre restart-loops on a bad config");
    assert!(
        Command::new("systemd-analyze").arg("--version").output().is_ok(),
        "systemd-analyze is needed to verify the unit (.ci/run installs the systemd package)"
    );
    // verify wants the executables to exist: point them at the test binary.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/sluice", BIN)).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&path).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "systemd-analyze verify: {stderr}");
}

#[tokio::test]
async fn notify_socket_gets_ready_reloading_stopping_in_order() {
    let mock = MockServer::start(([127, 0, 0, 1], 0).into()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sluice.toml");
    std::fs::write(&config, config_text(&mock.base_url(), &Opts::default())).unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&socket_path).unwrap();

    let mut child = tokio::process::Command::new(BIN)
        .args(["serve", "-c"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &socket_path)
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let ready = next(&socket).await;
    assert!(ready.contains("READY=1") && ready.contains("STATUS=listening on"), "{ready}");

    signal(&child, "-HUP");
    let reloading = next(&socket).await;
    assert!(reloading.contains("RELOADING=1") && reloading.contains("MONOTONIC_USEC="), "{reloading}");
    let ready_again = next(&socket).await;
    assert!(ready_again.contains("READY=1") && ready_again.contains("STATUS=reloaded"), "{ready_again}");

    signal(&child, "-TERM");
    let stopping = next(&socket).await;
    assert!(stopping.contains("STOPPING=1"), "{stopping}");
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait()).await.unwrap().unwrap();
    assert_eq!(status.code(), Some(0));
}

async fn next(socket: &tokio::net::UnixDatagram) -> String {
    let mut buf = vec![0u8; 4096];
    let n =
        tokio::time::timeout(Duration::from_secs(10), socket.recv(&mut buf)).await.expect("no notification").unwrap();
    String::from_utf8_lossy(&buf[..n]).to_string()
}

#[test]
fn install_script_installs_and_never_overwrites_config() {
    let root = tempfile::tempdir().unwrap();
    let run = || {
        Command::new("bash")
            .arg(Path::new(ROOT).join("systemd/install.sh"))
            .env("DESTDIR", root.path())
            .env("SLUICE_BIN", BIN)
            .env("SKIP_USER", "1")
            .env("SKIP_SYSTEMCTL", "1")
            .output()
            .unwrap()
    };
    let out = run();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let etc = root.path().join("etc/sluice");
    for (file, mode) in [("sluice.toml", 0o640), ("keys.txt", 0o640)] {
        let meta = std::fs::metadata(etc.join(file)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, mode, "{file}");
    }
    assert!(root.path().join("etc/systemd/system/sluice.service").exists());
    assert!(root.path().join("usr/local/bin/sluice").exists());
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("systemctl enable --now sluice"));
    // Every variable the installed config needs is named in the next steps.
    let installed = std::fs::read_to_string(etc.join("sluice.toml")).unwrap();
    for var in ["CLIENT_KEY", "ADMIN_TOKEN", "OPENAI_API_KEY"] {
        assert!(installed.contains(&format!("${{{var}}}")) && printed.contains(var), "{var}");
    }
    // The installed config reads the installed keys file.
    assert!(installed.lines().any(|l| l.trim_start().starts_with("keys_file = \"keys.txt\"")), "keys.txt is not read");
    let env = |name: &str| match name {
        "CLIENT_KEY" | "ADMIN_TOKEN" | "OPENAI_API_KEY" => Some(format!("{name}-value-long")),
        _ => None,
    };
    std::fs::write(etc.join("keys.txt"), "sk-from-keys-file\n").unwrap();
    let config = sluice::config::Config::from_toml(&installed, &etc.join("sluice.toml"), &env).unwrap();
    assert!(config.upstreams[0].keys().iter().any(|k| k.expose() == "sk-from-keys-file"));

    std::fs::write(etc.join("sluice.toml"), "# edited by the operator\n").unwrap();
    let again = run();
    assert!(again.status.success());
    assert_eq!(std::fs::read_to_string(etc.join("sluice.toml")).unwrap(), "# edited by the operator\n");
    assert!(String::from_utf8_lossy(&again.stdout).contains("kept existing"));
}
