//! Real Redis and PostgreSQL servers for the scale-out tests: each in a temp
//! dir of its own, on a free loopback port, stopped and restarted on the same
//! port at will. A missing binary fails the test loudly (`.ci/run` installs
//! them); nothing is skipped.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long a server may take to accept connections.
const READY_WITHIN: Duration = Duration::from_secs(10);
/// How often readiness is polled.
const POLL: Duration = Duration::from_millis(20);
/// Starts tried on the same port while it is still held (restart).
const START_ATTEMPTS: usize = 5;
/// What installs the binaries (as `.ci/run` does).
const INSTALL: &str = "apt-get install redis-server postgresql";

/// A free loopback port: bound on port 0, then let go.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("the bound address").port()
}

/// `name` on PATH, else in the folders given; panics naming the package.
fn find_binary(name: &str, also_in: &[PathBuf]) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(also_in.iter().cloned())
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| panic!("`{name}` not found on PATH or in {also_in:?}: run `{INSTALL}`"))
}

fn temp_dir(prefix: &str) -> TempDir {
    tempfile::Builder::new().prefix(prefix).tempdir_in(std::env::temp_dir()).expect("a temp dir")
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| format!("(no log at {}: {e})", path.display()))
}

/// Polls `ready` every 20 ms for up to 10 s; false if it never was.
fn wait_until(mut ready: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + READY_WITHIN;
    while Instant::now() < deadline {
        if ready() {
            return true;
        }
        std::thread::sleep(POLL);
    }
    ready()
}

/// Whether a Redis on `port` answers `PING`.
fn redis_pongs(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut answer = [0u8; 7];
    stream.write_all(b"PING\r\n").is_ok() && stream.read_exact(&mut answer).is_ok() && &answer == b"+PONG\r\n"
}

/// Whether something accepts connections on `port`.
fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_millis(200)).is_ok()
}

/// A `redis-server` of its own.
pub struct RedisServer {
    binary: PathBuf,
    dir: TempDir,
    port: u16,
    child: Option<Child>,
    /// `(certificate chain, key)` when it speaks only TLS.
    tls: Option<(PathBuf, PathBuf)>,
}

impl RedisServer {
    /// Starts one on a free port; panics if it cannot (or is not installed).
    pub fn start() -> Self {
        let binary = find_binary("redis-server", &[PathBuf::from("/usr/bin")]);
        let mut server = Self { binary, dir: temp_dir("sluice-redis-"), port: free_port(), child: None, tls: None };
        server.launch();
        server
    }

    /// Starts one that speaks only TLS, with this certificate chain and key
    /// (for `localhost`).
    pub fn start_tls(cert_file: &Path, key_file: &Path) -> Self {
        let binary = find_binary("redis-server", &[PathBuf::from("/usr/bin")]);
        let tls = Some((cert_file.to_path_buf(), key_file.to_path_buf()));
        let mut server = Self { binary, dir: temp_dir("sluice-redis-"), port: free_port(), child: None, tls };
        server.launch();
        server
    }

    /// `redis://127.0.0.1:PORT/0`, or `rediss://localhost:PORT/0` over TLS.
    pub fn url(&self) -> String {
        match self.tls {
            Some(_) => format!("rediss://localhost:{}/0", self.port),
            None => format!("redis://127.0.0.1:{}/0", self.port),
        }
    }

    /// The port it listens on (kept across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills it and waits for it to exit: the port then refuses connections.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port (its data is gone: no persistence).
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    fn launch(&mut self) {
        let log = self.dir.path().join("log");
        for _ in 0..START_ATTEMPTS {
            let out = std::fs::File::create(&log).expect("the redis log file");
            let err = out.try_clone().expect("the redis log file");
            let mut command = Command::new(&self.binary);
            match &self.tls {
                Some((cert, key)) => {
                    command.args(["--port", "0", "--tls-port", &self.port.to_string(), "--tls-auth-clients", "no"]);
                    command.arg("--tls-cert-file").arg(cert).arg("--tls-key-file").arg(key);
                }
                None => {
                    command.args(["--port", &self.port.to_string()]);
                }
            }
            let mut child = command
                .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(self.dir.path())
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {}: {e} (run `{INSTALL}`)", self.binary.display()));
            let (port, tls) = (self.port, self.tls.is_some());
            let mut exited = false;
            let ready = wait_until(|| {
                exited = exited || matches!(child.try_wait(), Ok(Some(_)));
                // Over TLS, an open port is as far as a plain check goes.
                exited || if tls { port_open(port) } else { redis_pongs(port) }
            });
            if ready && !exited {
                self.child = Some(child);
                return;
            }
            let _ = child.kill();
            let _ = child.wait();
            if !exited {
                break;
            }
            // Exited at once: the port is likely still held; try again.
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("redis-server did not answer PING on port {}: {}", self.port, read_log(&log));
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The pids of the processes whose parent is `parent`, read from /proc.
fn children_of(parent: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.to_string();
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // After the command name (which may hold spaces): state, then ppid.
            let ppid = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.to_string();
            (ppid == parent).then_some(pid)
        })
        .collect()
}

/// Whether this process runs as root (PostgreSQL refuses to).
fn is_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|uids| uids.split_whitespace().nth(1))
        .is_some_and(|effective| effective == "0")
}

/// The newest `/usr/lib/postgresql/N/bin`, if any.
fn newest_postgres_bin() -> Option<PathBuf> {
    let versions = std::fs::read_dir("/usr/lib/postgresql").ok()?;
    versions
        .filter_map(Result::ok)
        .filter_map(|entry| Some((entry.file_name().to_str()?.parse::<u32>().ok()?, entry.path().join("bin"))))
        .filter(|(_, bin)| bin.join("initdb").is_file())
        .max_by_key(|(version, _)| *version)
        .map(|(_, bin)| bin)
}

/// A PostgreSQL cluster of its own, with a database `sluice` owned by the
/// superuser `sluice` (trust authentication, over loopback TCP).
pub struct PgServer {
    pg_ctl: PathBuf,
    dir: TempDir,
    port: u16,
    as_postgres: bool,
    running: bool,
}

impl PgServer {
    /// Creates the cluster and starts it on a free port; panics if it cannot
    /// (or PostgreSQL is not installed).
    pub fn start() -> Self {
        let extra: Vec<PathBuf> = newest_postgres_bin().into_iter().collect();
        let initdb = find_binary("initdb", &extra);
        let pg_ctl = find_binary("pg_ctl", &extra);
        let dir = temp_dir("sluice-pg-");
        let as_postgres = is_root();
        if as_postgres {
            let status = Command::new("chown").arg("postgres:postgres").arg(dir.path()).status().expect("chown");
            assert!(status.success(), "cannot chown {} to postgres", dir.path().display());
        }
        let mut server = Self { pg_ctl, dir, port: free_port(), as_postgres, running: false };
        let data = server.data();
        let mut init = server.command(&initdb);
        init.arg("-D").arg(&data).args(["-A", "trust", "-U", "sluice", "--no-sync", "--locale=C", "-E", "UTF8"]);
        let output = init.output().unwrap_or_else(|e| panic!("cannot run {}: {e} (run `{INSTALL}`)", initdb.display()));
        assert!(output.status.success(), "initdb failed: {}", String::from_utf8_lossy(&output.stderr));
        // Two tests may pick the same free port: a new one on failure.
        for attempt in 0..START_ATTEMPTS {
            if server.try_start() {
                break;
            }
            assert!(attempt + 1 < START_ATTEMPTS, "PostgreSQL did not start: {}", read_log(&server.log()));
            server.port = free_port();
        }
        server.create_database();
        server
    }

    /// `postgres://sluice@127.0.0.1:PORT/sluice`.
    pub fn url(&self) -> String {
        format!("postgres://sluice@127.0.0.1:{}/sluice", self.port)
    }

    /// The port it listens on (kept across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops it at once (`-m immediate`, like a crash): the port then
    /// refuses connections and open ones are broken.
    pub fn stop(&mut self) {
        if !self.running {
            return;
        }
        self.running = false;
        // A frozen server (see `freeze`) would never stop.
        if let Ok(pid_file) = std::fs::read_to_string(self.data().join("postmaster.pid"))
            && let Some(pid) = pid_file.lines().next()
        {
            let mut pids = children_of(pid.trim());
            pids.push(pid.trim().to_string());
            let _ = Command::new("kill").arg("-CONT").args(&pids).status();
        }
        let mut stop = self.command(&self.pg_ctl);
        stop.arg("-D").arg(self.data()).args(["-m", "immediate", "-w", "-t", "10", "stop"]);
        let output = stop.output().expect("pg_ctl stop");
        assert!(output.status.success(), "pg_ctl stop failed: {}", String::from_utf8_lossy(&output.stderr));
    }

    /// Freezes (`true`: SIGSTOP) or thaws (`false`: SIGCONT) the server and
    /// every backend: connections stay open, nothing is answered.
    pub fn freeze(&self, frozen: bool) {
        let pid_file = std::fs::read_to_string(self.data().join("postmaster.pid")).expect("postmaster.pid");
        let pid = pid_file.lines().next().expect("the postmaster's pid").trim().to_string();
        // Each backend is a session of its own: signal the postmaster's
        // children (found by parent in /proc), then the postmaster.
        let signal = if frozen { "-STOP" } else { "-CONT" };
        let mut pids = children_of(&pid);
        assert!(!pids.is_empty(), "the postmaster {pid} has no backend");
        pids.push(pid);
        let status = Command::new("kill").arg(signal).args(&pids).status().expect("kill (util-linux)");
        assert!(status.success(), "kill {signal} {pids:?} failed");
    }

    /// Starts it again on the same port, with the same data.
    pub fn restart(&mut self) {
        self.stop();
        for _ in 0..START_ATTEMPTS {
            if self.try_start() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("PostgreSQL did not start again on port {}: {}", self.port, read_log(&self.log()));
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("log")
    }

    /// `program`, as the `postgres` user when this process is root.
    fn command(&self, program: &Path) -> Command {
        let mut command = if self.as_postgres {
            let mut runuser = Command::new("runuser");
            runuser.args(["-u", "postgres", "--"]).arg(program);
            runuser
        } else {
            Command::new(program)
        };
        command.current_dir(self.dir.path()).stdin(Stdio::null());
        command
    }

    /// `pg_ctl start -w`, then a TCP connect within 10 s.
    fn try_start(&mut self) -> bool {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c shared_buffers=16MB -c max_connections=40",
            self.port,
            self.dir.path().display()
        );
        let mut start = self.command(&self.pg_ctl);
        start.arg("-D").arg(self.data()).arg("-o").arg(options).args(["-w", "-t", "10", "-l"]).arg(self.log());
        let status = start.arg("start").stdout(Stdio::null()).stderr(Stdio::null()).status().expect("pg_ctl start");
        if !status.success() {
            return false;
        }
        self.running = true;
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        wait_until(|| TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok())
    }

    /// `CREATE DATABASE sluice`, on a thread of its own (the sync client
    /// may not run inside a test's runtime).
    fn create_database(&self) {
        let port = self.port;
        let created = std::thread::spawn(move || {
            let mut client = postgres::Config::new()
                .host("127.0.0.1")
                .port(port)
                .user("sluice")
                .dbname("postgres")
                .connect_timeout(READY_WITHIN)
                .connect(postgres::NoTls)?;
            client.batch_execute("CREATE DATABASE sluice")
        })
        .join()
        .expect("the create-database thread");
        if let Err(e) = created {
            panic!("cannot create the database: {e:?}: {}", read_log(&self.log()));
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if self.running {
            self.running = false;
            let mut stop = self.command(&self.pg_ctl);
            let _ = stop.arg("-D").arg(self.data()).args(["-m", "immediate", "stop"]).output();
        }
    }
}

#[test]
fn redis_stops_and_starts_again_on_the_same_port() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    assert!(url.starts_with("redis://127.0.0.1:") && redis_pongs(redis.port()), "{url}");
    redis.stop();
    assert!(TcpStream::connect(("127.0.0.1", redis.port())).is_err(), "stopped, yet the port accepts");
    redis.restart();
    assert_eq!(redis.url(), url);
    assert!(redis_pongs(redis.port()));
}
