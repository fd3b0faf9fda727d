//! The request log: one JSON line per finished request. The request path
//! formats its line on its own thread (from borrowed fields: no reference
//! count of a shared name is touched on another core) and appends it to a
//! buffer bounded in bytes, under a lock held for one copy (and, in a burst
//! past the buffer's capacity, for its growth). There is one buffer for the
//! runtime's workers and one for each event loop, so loops on different
//! cores never contend for a lock (lines of one connection stay in order;
//! lines of different loops reach the file in batches, each in order). A
//! dedicated thread takes the buffers every [`DRAIN_INTERVAL`], or at once
//! when one passes [`WAKE_AT`] bytes (one wake-up per drain at most), and
//! writes them to the file: the request path never waits for the disk. When
//! a buffer is full, lines are dropped and counted. Lines a failing write
//! (a full disk) could not take are kept for the next drain, up to the same
//! bound (past it they are dropped and counted); a line a write cut part
//! way is ended in the file it began in before another file is opened.
//! (After a restart, the first line follows such a fragment: the file is
//! opened for appending only, its last byte is not read.)
//!
//! Files rotate by size: `requests.jsonl` -> `requests.jsonl.1` -> ... `.keep`.
//! An outside rotation (logrotate moving the file away) is noticed within a
//! second by the file's inode, or at once on [`AccessLog::reopen`] (SIGUSR1).
//! A file that cannot be reopened is retried once a second, never renamed
//! again meanwhile.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::Thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

mod line;

use http::{HeaderValue, Method};

use crate::tasks::loops;

/// Bytes of lines the buffer holds before lines are dropped: ~3000 lines of
/// ~350 bytes, ~35 ms of the fastest rate measured here (88k lines a
/// second). Grown as needed (its capacity never past this), not allocated up
/// front, and given back after a burst (see [`RETAIN`]). With N event loops
/// there are N + 1 buffers (the workers' and one a loop) of half this each
/// (each loop takes its share of the rate). Also the bound of the lines a
/// failing disk left unwritten.
pub const MAX_PENDING: usize = 1 << 20;
/// Bytes a buffer holds at which the request path wakes the writer before
/// its timer (~180 lines): a sixteenth of [`MAX_PENDING`] (an eighth of a
/// loop's buffer), so the rest is left for the time the woken thread waits
/// for a core (a queue of 1024 lines woken at a quarter full dropped lines
/// on a busy 2-core machine).
pub const WAKE_AT: usize = MAX_PENDING / 16;
/// The capacity a buffer keeps after a drain: what a busy period fills
/// between two wake-ups. A burst's larger buffers are given back, so a
/// burst leaves at most this much behind in each buffer, the writer's
/// included.
const RETAIN: usize = 2 * WAKE_AT;
/// How often the writer drains the buffer (a line reaches the file within about this).
pub const DRAIN_INTERVAL: Duration = Duration::from_millis(20);

/// One finished request, borrowed from its context and formatted at once on
/// the request's thread.
#[derive(Debug)]
pub struct Record<'a> {
    /// When the request arrived.
    pub arrived: SystemTime,
    /// `x-request-id`.
    pub request_id: &'a HeaderValue,
    /// The authenticated client by its label (`key:ID`, `client:NAME`,
    /// `config:N`), if one was presented.
    pub client: Option<&'a str>,
    /// The client key's user, if it has one.
    pub user: Option<&'a str>,
    /// HTTP method.
    pub method: &'a Method,
    /// The request path; never the query (it may carry `api_key`).
    pub path: &'a str,
    /// Model as routed.
    pub model: Option<&'a str>,
    /// Upstream name.
    pub upstream: Option<&'a str>,
    /// The model name sent there (after renames and fallbacks).
    pub upstream_model: Option<&'a HeaderValue>,
    /// Fingerprint of the upstream key of the answer.
    pub key: Option<&'a str>,
    /// Status sent to the client.
    pub status: u16,
    /// Upstream attempts made.
    pub attempts: u32,
    /// Milliseconds until the end of the response body.
    pub duration_ms: f64,
    /// Milliseconds until the upstream's response headers.
    pub upstream_ttfb_ms: Option<f64>,
    /// Request body bytes read.
    pub bytes_in: u64,
    /// Response body bytes sent.
    pub bytes_out: u64,
    /// Prompt tokens from the upstream's `usage`.
    pub prompt_tokens: Option<u64>,
    /// Completion tokens from the upstream's `usage`.
    pub completion_tokens: Option<u64>,
    /// A streaming request.
    pub stream: bool,
    /// What the response cache did (`hit`, `miss`, `bypass`), if it could act.
    pub cache: Option<&'static str>,
    /// Error kind when sluice answered with an error, or how a body ended badly.
    pub error: Option<&'static str>,
}

/// One buffer of whole lines waiting for the writer, on cache lines of its
/// own (two loops' locks side by side would still bounce between cores).
#[derive(Default)]
#[repr(align(128))]
struct Pending(Mutex<Vec<u8>>);

impl Pending {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What the request path and the writer share.
struct Handoff {
    /// The workers' buffer, then each event loop's.
    pending: Box<[Pending]>,
    /// Bytes each buffer holds at most.
    max_pending: usize,
    /// Flushes asked for and flushes done, for [`AccessLog::flush`].
    flush_asked: AtomicU64,
    flush_done: AtomicU64,
    closed: AtomicBool,
    /// Set by the request path when it woke the writer early; cleared by the
    /// writer once it drained, so a busy period costs one wake-up per drain.
    woken: AtomicBool,
    /// Set by [`AccessLog::reopen`]; the writer reopens the file and clears it.
    reopen: AtomicBool,
    /// Lines dropped: the buffer full, or past the bound of what a failing
    /// disk left unwritten.
    dropped: Arc<AtomicU64>,
}

impl Handoff {
    /// The buffers of the workers and of `loops` event loops.
    fn new(loops: usize) -> Self {
        Self {
            pending: (0..=loops).map(|_| Pending::default()).collect(),
            max_pending: if loops == 0 { MAX_PENDING } else { MAX_PENDING / 2 },
            dropped: Arc::default(),
            flush_asked: AtomicU64::new(0),
            flush_done: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            woken: AtomicBool::new(false),
            reopen: AtomicBool::new(false),
        }
    }

    /// Appends one line to the calling thread's buffer unless it is full;
    /// returns whether it went in, and the bytes that buffer now holds.
    fn append(&self, line: &[u8]) -> (bool, usize) {
        let max = self.max_pending;
        let mut pending = loops::here(&self.pending).lock();
        let needed = pending.len() + line.len();
        if needed > max {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return (false, pending.len());
        }
        if needed > pending.capacity() {
            // Doubling, but never to a capacity past the bound.
            let additional = (2 * pending.capacity()).clamp(needed, max) - pending.len();
            pending.reserve_exact(additional);
        }
        pending.extend_from_slice(line);
        (true, pending.len())
    }
}

/// The capacity a thread's line buffer keeps: any usual line fits.
const SCRATCH_KEEP: usize = 4096;

thread_local! {
    /// The line being formatted and the timestamp text of the current
    /// second, per thread: formatting takes no lock, and allocates only for
    /// a line longer than [`SCRATCH_KEEP`] (given back after it) and the
    /// timestamp text once a second.
    static SCRATCH: RefCell<(Vec<u8>, Timestamps)> = RefCell::new((Vec::with_capacity(512), Timestamps::default()));
}

/// Handle to the writer thread; dropping it lets the writer drain and stop.
pub struct AccessLog {
    shared: Arc<Handoff>,
    writer: Thread,
}

impl AccessLog {
    /// Opens (creating folders) the log file and starts the writer thread,
    /// with a buffer for the workers and one for each of `loops` event loops.
    pub fn start(path: PathBuf, max_size: u64, keep: usize, loops: usize) -> std::io::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut writer = Writer::new(path, max_size, keep, open)?;
        let shared = Arc::new(Handoff::new(loops));
        writer.dropped = Arc::clone(&shared.dropped);
        let for_writer = Arc::clone(&shared);
        let handle =
            std::thread::Builder::new().name("sluice-request-log".into()).spawn(move || writer.run(&for_writer))?;
        Ok(Self { shared, writer: handle.thread().clone() })
    }

    /// Formats `record` and buffers its line; false if the buffer is full
    /// (the line is dropped, and counted in [`AccessLog::dropped`]).
    pub fn log(&self, record: &Record<'_>) -> bool {
        let format = |(line, clock): &mut (Vec<u8>, Timestamps)| {
            line.clear();
            line::write(line, record, clock.format(record.arrived));
            line.push(b'\n');
            let appended = self.shared.append(line);
            // A rare long line (a long path) leaves no large buffer per thread.
            if line.capacity() > SCRATCH_KEEP {
                line.clear();
                line.shrink_to(SCRATCH_KEEP);
            }
            appended
        };
        // A thread tearing down its locals (a body dropped with its runtime)
        // formats into a buffer of its own.
        let (queued, buffered) = SCRATCH
            .try_with(|scratch| format(&mut scratch.borrow_mut()))
            .unwrap_or_else(|_| format(&mut (Vec::new(), Timestamps::default())));
        if buffered >= WAKE_AT && !self.shared.woken.swap(true, Ordering::AcqRel) {
            self.writer.unpark();
        }
        queued
    }

    /// The count of lines dropped so far (`sluice_request_log_dropped_total`).
    pub fn dropped(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.shared.dropped)
    }

    /// Asks the writer to reopen the file by its path (after an outside
    /// rotation; SIGUSR1 calls this).
    pub fn reopen(&self) {
        self.shared.reopen.store(true, Ordering::SeqCst);
        self.writer.unpark();
    }

    /// Waits (up to 5 s) until every line buffered so far is written (or,
    /// while the disk refuses writes, kept for the next try) (shutdown, tests).
    pub fn flush(&self) {
        let ticket = self.shared.flush_asked.fetch_add(1, Ordering::SeqCst) + 1;
        self.writer.unpark();
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.shared.flush_done.load(Ordering::SeqCst) < ticket && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        self.writer.unpark();
    }
}

/// Writes what it can of `bytes`: the bytes written, and the error that
/// stopped it short, if one did.
fn write_some(out: &mut impl Write, bytes: &[u8]) -> (usize, Option<std::io::Error>) {
    let mut done = 0;
    while done < bytes.len() {
        match out.write(&bytes[done..]) {
            Ok(0) => return (done, Some(std::io::ErrorKind::WriteZero.into())),
            Ok(n) => done += n,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => return (done, Some(error)),
        }
    }
    (done, None)
}

fn open(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// How often the writer checks that its file is still the one at its path.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// How the writer opens its file (a seam for tests of failing opens).
type Opener = fn(&Path) -> std::io::Result<File>;

struct Writer {
    path: PathBuf,
    opener: Opener,
    max_size: u64,
    keep: usize,
    out: File,
    written: u64,
    /// The inode of the open file, to notice an outside rotation.
    inode: u64,
    /// When the path was last checked (or a failed reopen retried).
    checked: Instant,
    /// A reopen failed; it is retried every [`CHECK_EVERY`], and no rotation
    /// starts meanwhile.
    reopen_due: bool,
    /// A buffer per request-path buffer, swapped with it at each drain (so
    /// two of each in all, each shrunk back to [`RETAIN`] after a drain).
    spares: Vec<Vec<u8>>,
    /// Lines a failing write could not take, written first at the next drain.
    unwritten: Vec<u8>,
    /// The open file ends inside a line (a write stopped part way): its
    /// rest, at the start of `unwritten`, must go to this file.
    torn: bool,
    /// Lines dropped (shared with [`Handoff::dropped`]).
    dropped: Arc<AtomicU64>,
    /// The last write failed (said once, at ERROR, until one works again).
    failing: bool,
}

impl Writer {
    fn new(path: PathBuf, max_size: u64, keep: usize, opener: Opener) -> std::io::Result<Self> {
        let file = opener(&path)?;
        let meta = file.metadata()?;
        Ok(Self {
            path,
            opener,
            max_size: max_size.max(1),
            keep,
            out: file,
            written: meta.len(),
            inode: meta.ino(),
            checked: Instant::now(),
            reopen_due: false,
            spares: Vec::new(),
            unwritten: Vec::new(),
            torn: false,
            dropped: Arc::default(),
            failing: false,
        })
    }

    fn run(mut self, shared: &Handoff) {
        loop {
            // Read the flush ticket first: every line buffered before it is written below.
            let asked = shared.flush_asked.load(Ordering::SeqCst);
            let closed = shared.closed.load(Ordering::SeqCst);
            shared.woken.store(false, Ordering::Release);
            if shared.reopen.swap(false, Ordering::SeqCst) {
                self.reopen();
            } else if self.checked.elapsed() >= CHECK_EVERY {
                self.checked = Instant::now();
                if self.reopen_due || self.moved() {
                    self.reopen();
                }
            }
            self.drain(shared);
            shared.flush_done.store(asked, Ordering::SeqCst);
            if closed {
                let lost = std::mem::take(&mut self.unwritten);
                let lines = self.drop_lines(&lost);
                if lines > 0 {
                    tracing::warn!(lines, path = %self.path.display(), "request log: lines the disk refused are lost at shutdown");
                }
                return;
            }
            std::thread::park_timeout(DRAIN_INTERVAL);
        }
    }

    /// Takes the buffered lines (each buffer swapped for its empty spare
    /// under its lock) and writes them, buffer by buffer, after any an
    /// earlier write could not take; each spare keeps at most [`RETAIN`] of
    /// its capacity. While writes fail (a full disk), what they could not
    /// take is kept, whole lines up to [`MAX_PENDING`] bytes; lines past
    /// that are dropped and counted.
    fn drain(&mut self, shared: &Handoff) {
        let mut spares = std::mem::take(&mut self.spares);
        spares.resize_with(shared.pending.len(), Vec::new);
        for (pending, spare) in shared.pending.iter().zip(&mut spares) {
            // Under the lock only a swap: the request path appends again at
            // once, into a buffer that kept its capacity, so it does not
            // grow one from nothing every drain.
            std::mem::swap(&mut *pending.lock(), spare);
        }
        let mut kept = std::mem::take(&mut self.unwritten);
        if !kept.is_empty() {
            let done = self.write(&kept);
            kept.drain(..done);
        }
        for lines in &mut spares {
            // While writes fail, keep what they could not take (the rest of
            // a line cut part way first), whole lines up to the bound.
            let left = if kept.is_empty() { &lines[self.write(lines)..] } else { &lines[..] };
            let room = MAX_PENDING.saturating_sub(kept.len());
            let fits = if left.len() <= room {
                left.len()
            } else {
                memchr::memrchr(b'\n', &left[..room]).map_or(0, |i| i + 1)
            };
            self.drop_lines(&left[fits..]);
            kept.extend_from_slice(&left[..fits]);
            lines.clear();
            lines.shrink_to(RETAIN);
        }
        // Nothing kept: its buffer is given back.
        self.unwritten = if kept.is_empty() { Vec::new() } else { kept };
        self.spares = spares;
    }

    /// Counts the lines in `bytes` as dropped; returns how many.
    fn drop_lines(&self, bytes: &[u8]) -> u64 {
        let lost = memchr::memchr_iter(b'\n', bytes).count() as u64;
        if lost > 0 {
            self.dropped.fetch_add(lost, Ordering::Relaxed);
        }
        lost
    }

    /// Writes whole lines (`lines` ends with a newline), rotating after the
    /// line that brings the file to `max_size` (a line is never split
    /// between two files). Returns the bytes written: all, or up to where a
    /// write failed.
    fn write(&mut self, mut lines: &[u8]) -> usize {
        debug_assert!(lines.is_empty() || lines.ends_with(b"\n"), "whole lines only");
        let total = lines.len();
        while !lines.is_empty() {
            let room = self.max_size.saturating_sub(self.written);
            let take = if self.reopen_due || (lines.len() as u64) < room {
                lines.len()
            } else {
                // The line holding byte `room - 1` reaches the size: up to its end.
                let from = usize::try_from(room.saturating_sub(1)).unwrap_or(usize::MAX).min(lines.len());
                memchr::memchr(b'\n', &lines[from..]).map_or(lines.len(), |i| from + i + 1)
            };
            let (now, rest) = lines.split_at(take);
            let (done, failed) = write_some(&mut self.out, now);
            self.written += done as u64;
            if done > 0 {
                self.torn = now[done - 1] != b'\n';
            }
            if let Some(error) = failed {
                if !std::mem::replace(&mut self.failing, true) {
                    tracing::error!(%error, path = %self.path.display(), "request log write failed; lines are kept and retried");
                }
                return total - lines.len() + done;
            }
            if std::mem::replace(&mut self.failing, false) {
                tracing::info!(path = %self.path.display(), "request log writable again");
            }
            lines = rest;
            if self.written >= self.max_size && !self.reopen_due {
                self.rotate();
            }
        }
        total
    }

    /// Before another file takes over: the rest of a line a write stopped
    /// inside goes to the file holding its start; if the disk still refuses
    /// it, the line is dropped and counted (and that file ends with its part).
    fn end_torn_line(&mut self) {
        if !std::mem::take(&mut self.torn) {
            return;
        }
        let end = memchr::memchr(b'\n', &self.unwritten).map_or(self.unwritten.len(), |i| i + 1);
        let (done, _) = write_some(&mut self.out, &self.unwritten[..end]);
        if done < end {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        self.unwritten.drain(..end);
    }

    /// Whether the file at the path is not the one open (moved away or gone).
    fn moved(&self) -> bool {
        std::fs::metadata(&self.path).map_or(true, |meta| meta.ino() != self.inode)
    }

    /// Opens the file at the path again; on failure, lines keep going to the
    /// file still open and the reopen is retried later.
    fn reopen(&mut self) {
        let opened = (self.opener)(&self.path).and_then(|file| Ok((file.metadata()?, file)));
        match opened {
            Ok((meta, file)) => {
                self.end_torn_line();
                if self.reopen_due {
                    tracing::info!(path = %self.path.display(), "request log reopened");
                }
                self.out = file;
                self.written = meta.len();
                self.inode = meta.ino();
                self.reopen_due = false;
            }
            Err(error) => {
                if !self.reopen_due {
                    tracing::error!(%error, path = %self.path.display(), "cannot open the request log; retrying every second");
                }
                self.reopen_due = true;
            }
        }
        self.checked = Instant::now();
    }

    fn rotate(&mut self) {
        let numbered = |n: usize| PathBuf::from(format!("{}.{n}", self.path.display()));
        let moved = if self.keep == 0 {
            std::fs::remove_file(&self.path)
        } else {
            let _ = std::fs::remove_file(numbered(self.keep));
            for n in (1..self.keep).rev() {
                match std::fs::rename(numbered(n), numbered(n + 1)) {
                    Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                        tracing::warn!(%error, from = %numbered(n).display(), "request log rotation: rename failed");
                    }
                    _ => {}
                }
            }
            std::fs::rename(&self.path, numbered(1))
        };
        if let Err(error) = moved {
            // The live file stays where it is: keep writing to it, and try
            // again only after another `max_size`, not on every line.
            tracing::error!(%error, path = %self.path.display(), "request log rotation failed; the file keeps growing");
            self.written = 0;
            return;
        }
        self.reopen();
    }
}

/// RFC 3339 timestamps for a writer that formats many within one second:
/// the text up to the seconds is made once a second, the milliseconds per line.
#[derive(Default)]
struct Timestamps {
    second: Option<u64>,
    /// ASCII only.
    text: Vec<u8>,
}

impl Timestamps {
    fn format(&mut self, at: SystemTime) -> &[u8] {
        let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
        if self.second != Some(since.as_secs()) {
            self.second = Some(since.as_secs());
            self.text = rfc3339(UNIX_EPOCH + Duration::from_secs(since.as_secs())).into_bytes();
        }
        // "...SS.mmmZ": the three millisecond digits, in place.
        let millis = since.subsec_millis();
        let at = self.text.len() - 4;
        self.text[at..at + 3].copy_from_slice(&[
            b'0' + (millis / 100) as u8,
            b'0' + (millis / 10 % 10) as u8,
            b'0' + (millis % 10) as u8,
        ]);
        &self.text
    }
}

/// `2026-11-22T10:05:12.290Z`.
pub fn rfc3339(at: SystemTime) -> String {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    static POST: Method = Method::POST;
    static UPSTREAM_MODEL: HeaderValue = HeaderValue::from_static("m-2024");

    /// A request id per line, so a test can find its lines.
    fn id(n: u16) -> HeaderValue {
        HeaderValue::from_str(&format!("req-{n}")).unwrap()
    }

    fn record(request_id: &HeaderValue) -> Record<'_> {
        Record {
            arrived: SystemTime::now(),
            request_id,
            client: Some("key:7"),
            user: Some("alice"),
            method: &POST,
            path: "/v1/chat/completions",
            model: Some("m"),
            upstream: Some("u"),
            upstream_model: Some(&UPSTREAM_MODEL),
            key: Some("sk-u…00000000"),
            status: 200,
            attempts: 1,
            duration_ms: 1.5,
            upstream_ttfb_ms: Some(1.0),
            bytes_in: 10,
            bytes_out: 20,
            prompt_tokens: Some(3),
            completion_tokens: Some(4),
            stream: false,
            cache: None,
            error: None,
        }
    }

    /// Line `n` as the request path formats it.
    fn line(n: u16) -> Vec<u8> {
        let mut out = Vec::new();
        line::write(&mut out, &record(&id(n)), b"2026-12-02T10:00:00.123Z");
        out.push(b'\n');
        out
    }

    #[test]
    fn a_sixteenth_full_buffer_wakes_the_writer_once_per_drain() {
        // No writer thread: this thread stands in for it and drains by hand.
        let log = AccessLog { shared: Arc::new(Handoff::new(0)), writer: std::thread::current() };
        let woken = || log.shared.woken.load(Ordering::Acquire);
        let buffered = || log.shared.pending[0].lock().len();
        let mut n = 0;
        while buffered() + line(n).len() < WAKE_AT {
            assert!(log.log(&record(&id(n))));
            n += 1;
        }
        assert!(!woken(), "below a sixteenth full the timer drains");
        assert!(log.log(&record(&id(n))));
        assert!(woken(), "a sixteenth full wakes the writer");
        // Until the writer drains, the flag stays set: further lines skip the wake-up.
        assert!(log.log(&record(&id(1))) && woken());
        // The writer's drain: clear the flag, take the lines.
        log.shared.woken.store(false, Ordering::Release);
        let taken = std::mem::take(&mut *log.shared.pending[0].lock());
        assert!(log.log(&record(&id(2))) && !woken());
        // Whole lines, each the request path's format, in order.
        let lines: Vec<&[u8]> = taken.split_inclusive(|&b| b == b'\n').collect();
        assert_eq!(lines.len(), usize::from(n) + 2);
        assert!(lines.iter().all(|l| serde_json::from_slice::<serde_json::Value>(l).is_ok()));
        assert!(String::from_utf8_lossy(lines[usize::from(n)]).contains(&format!("\"req-{n}\"")));
        // A full buffer drops and says so, and holds no part of the line.
        while log.log(&record(&id(3))) {}
        let full = buffered();
        assert!(full <= MAX_PENDING && full + line(4).len() > MAX_PENDING);
        assert!(!log.log(&record(&id(4))));
        assert_eq!(buffered(), full);
    }

    #[test]
    fn cached_timestamps_match_full_formatting_across_seconds() {
        let mut clock = Timestamps::default();
        for millis in [784_111_777_123u64, 784_111_777_999, 784_111_778_000, 784_111_778_007, 1_582_934_399_999, 0] {
            let at = UNIX_EPOCH + Duration::from_millis(millis);
            assert_eq!(clock.format(at), rfc3339(at).as_bytes(), "{millis}");
        }
    }

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_millis(784_111_777_123)), "1994-11-06T08:49:37.123Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(1_582_934_400)), "2020-02-29T00:00:00.000Z");
    }

    #[test]
    fn writes_lines_and_rotates_by_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs/requests.jsonl");
        // Each line is ~350 bytes: rotate about every third line, keep two old files.
        let log = AccessLog::start(path.clone(), 1000, 2, 0).unwrap();
        for n in 0..20 {
            assert!(log.log(&record(&id(n))));
        }
        log.flush();
        let current = std::fs::read_to_string(&path).unwrap();
        let rotated = std::fs::read_to_string(dir.path().join("logs/requests.jsonl.1")).unwrap();
        assert!(dir.path().join("logs/requests.jsonl.2").exists());
        assert!(!dir.path().join("logs/requests.jsonl.3").exists(), "keep = 2");
        for line in current.lines().chain(rotated.lines()) {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["status"], 200);
            assert_eq!(v["path"], "/v1/chat/completions", "the query never reaches the log");
            assert_eq!(v["upstream_model"], "m-2024");
        }
        assert!(current.lines().chain(rotated.lines()).any(|l| l.contains("\"req-19\"")));
    }

    #[test]
    fn a_long_line_leaves_no_large_buffer_on_its_thread() {
        let log = AccessLog { shared: Arc::new(Handoff::new(0)), writer: std::thread::current() };
        let path = format!("/v1/files/{}", "a".repeat(100_000));
        let request_id = id(1);
        assert!(log.log(&Record { path: &path, ..record(&request_id) }));
        let capacity = SCRATCH.with_borrow(|(line, _)| line.capacity());
        assert!(capacity <= SCRATCH_KEEP, "kept {capacity} bytes");
        let buffered = log.shared.pending[0].lock().clone();
        assert!(buffered.windows(100_000).any(|w| w.iter().all(|&b| b == b'a')), "the long line is logged whole");
    }

    #[test]
    fn each_event_loop_buffers_its_own_lines_and_the_writer_takes_all() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("requests.jsonl");
        let shared = Handoff::new(2);
        let mut writer = Writer::new(path.clone(), 1 << 30, 1, open).unwrap();
        assert!(shared.append(&line(0)).0);
        crate::tasks::loops::as_loop(0, || assert!(shared.append(&line(1)).0 && shared.append(&line(2)).0));
        crate::tasks::loops::as_loop(1, || assert!(shared.append(&line(3)).0));
        let held: Vec<usize> = shared.pending.iter().map(|p| p.lock().len()).collect();
        assert_eq!(held, [line(0).len(), line(1).len() + line(2).len(), line(3).len()], "a buffer per loop");
        // Each loop's buffer holds half of the bound.
        crate::tasks::loops::as_loop(1, || while shared.append(&line(4)).0 {});
        assert!(shared.pending[2].lock().len() <= MAX_PENDING / 2);
        assert!(shared.pending[2].lock().len() + line(4).len() > MAX_PENDING / 2);
        writer.drain(&shared);
        assert!(shared.pending.iter().all(|p| p.lock().is_empty() && p.lock().capacity() <= RETAIN));
        let written = std::fs::read_to_string(&path).unwrap();
        let ids: Vec<String> = written
            .lines()
            .take(4)
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["request_id"].to_string())
            .collect();
        assert_eq!(ids, ["\"req-0\"", "\"req-1\"", "\"req-2\"", "\"req-3\""], "every buffer, each in order");
        assert_eq!(lines(&path), 4 + (MAX_PENDING / 2) / line(4).len() - 1, "every line held, written");
    }

    #[test]
    fn a_burst_leaves_no_large_buffer_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("requests.jsonl");
        let shared = Handoff::new(0);
        let mut writer = Writer::new(path.clone(), 1 << 30, 1, open).unwrap();
        // A burst fills the buffer to the top; two drains cycle both buffers.
        let mut n = 0;
        while shared.append(&line(n)).0 {
            n += 1;
        }
        let capacity = shared.pending[0].lock().capacity();
        assert!(capacity > RETAIN && capacity <= MAX_PENDING, "grown, never past the bound: {capacity}");
        writer.drain(&shared);
        writer.drain(&shared);
        assert!(writer.spares.iter().all(|s| s.capacity() <= RETAIN) && shared.pending[0].lock().capacity() <= RETAIN);
        assert_eq!(lines(&path), usize::from(n), "every buffered line written");
    }

    /// A file on a disk with no room left.
    fn full_disk(_: &Path) -> std::io::Result<File> {
        OpenOptions::new().write(true).open("/dev/full")
    }

    #[test]
    fn lines_a_full_disk_refused_are_kept_whole_and_dropped_past_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("requests.jsonl");
        let shared = Handoff::new(0);
        let mut writer = Writer::new(path.clone(), 1 << 30, 1, full_disk).unwrap();
        writer.dropped = Arc::clone(&shared.dropped);
        let kept: Vec<u8> = (0..3).flat_map(line).collect();
        assert!(shared.append(&kept).0);
        writer.drain(&shared);
        assert_eq!(writer.unwritten, kept, "refused lines are kept for the next drain");
        // The disk stays full while the buffer fills to the top: those lines
        // go past the bound, and are dropped and counted, not kept.
        let mut n = 3;
        while shared.append(&line(n)).0 {
            n += 1;
        }
        let refused_at_append = shared.dropped.load(Ordering::Relaxed);
        assert_eq!(refused_at_append, 1);
        writer.drain(&shared);
        // Kept first, then whole new lines up to the bound; the rest counted.
        let held = writer.unwritten.clone();
        assert!(held.starts_with(&kept) && held.ends_with(b"\n") && held.len() <= MAX_PENDING);
        let lines_held = held.iter().filter(|&&b| b == b'\n').count() as u64;
        let dropped_at_drain = shared.dropped.load(Ordering::Relaxed) - refused_at_append;
        assert!(dropped_at_drain > 0, "the buffer was full: not all of it fits beside the kept lines");
        assert_eq!(lines_held + dropped_at_drain, u64::from(n), "every line held or counted");
        // Room again: the kept lines go first, whole, then the new ones.
        writer.out = open(&path).unwrap();
        assert!(shared.append(&line(9999)).0);
        writer.drain(&shared);
        assert!(writer.unwritten.is_empty() && writer.unwritten.capacity() == 0);
        assert_eq!(std::fs::read(&path).unwrap(), [held, line(9999)].concat());
    }

    #[test]
    fn a_line_a_failing_write_cut_is_ended_in_its_own_file_before_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (path, moved) = (dir.path().join("requests.jsonl"), dir.path().join("requests.jsonl-old"));
        let mut writer = Writer::new(path.clone(), 1 << 30, 1, open).unwrap();
        // A write stopped 10 bytes into a line: its start is in the file, its rest kept.
        let cut = line(5);
        assert_eq!(write_some(&mut writer.out, &cut[..10]).0, 10);
        (writer.torn, writer.unwritten) = (true, cut[10..].to_vec());
        // logrotate moves the file away; the writer follows the path.
        std::fs::rename(&path, &moved).unwrap();
        writer.reopen();
        let shared = Handoff::new(0);
        assert!(shared.append(&line(6)).0);
        writer.drain(&shared);
        assert_eq!(std::fs::read(&moved).unwrap(), cut, "the cut line ends in the file it began in");
        assert_eq!(std::fs::read(&path).unwrap(), line(6), "the new file starts on a whole line");
    }

    #[test]
    fn a_drained_chunk_rotates_after_the_line_that_reaches_the_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("requests.jsonl");
        // Lines of ~350 bytes; 1000 bytes a file: three lines each, the
        // third one passing the size, however the chunk is cut.
        let mut writer = Writer::new(path.clone(), 1000, 5, open).unwrap();
        let chunk: Vec<u8> = (0..10).flat_map(line).collect();
        writer.write(&chunk);
        let read = |p: &Path| std::fs::read(p).unwrap_or_default();
        let files: Vec<Vec<u8>> =
            (1..=3).rev().map(|n| read(&dir.path().join(format!("requests.jsonl.{n}")))).chain([read(&path)]).collect();
        assert_eq!(files.iter().map(|f| f.split_inclusive(|&b| b == b'\n').count()).collect::<Vec<_>>(), [3, 3, 3, 1]);
        for file in &files[..3] {
            let last = file.split_inclusive(|&b| b == b'\n').next_back().unwrap();
            assert!(
                file.len() >= 1000 && file.len() - last.len() < 1000,
                "rotated exactly after the line reaching the size"
            );
        }
        assert_eq!(files.concat(), chunk, "every line once, in order, none split");
    }

    /// Lines in `path` (0 if it does not exist).
    fn lines(path: &Path) -> usize {
        std::fs::read_to_string(path).map_or(0, |text| text.lines().count())
    }

    #[test]
    fn an_outside_rotation_is_followed_on_reopen_and_by_inode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("requests.jsonl");
        let log = AccessLog::start(path.clone(), 1 << 20, 2, 0).unwrap();
        assert!(log.log(&record(&id(1))));
        log.flush();
        // logrotate's default: move the file away, then signal.
        std::fs::rename(&path, dir.path().join("requests.jsonl-old")).unwrap();
        log.reopen();
        assert!(log.log(&record(&id(2))));
        log.flush();
        assert_eq!((lines(&path), lines(&dir.path().join("requests.jsonl-old"))), (1, 1));
        // No signal this time: the writer notices the new inode by itself
        // (it checks once a second; bounded wait of 5 s).
        std::fs::rename(&path, dir.path().join("requests.jsonl-older")).unwrap();
        for n in 0..500 {
            assert!(log.log(&record(&id(n))));
            log.flush();
            if lines(&path) > 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(lines(&path) > 0, "the moved file was never noticed");
    }

    /// Opens like the writer does, except while [`REFUSE`] is set.
    static REFUSE: AtomicBool = AtomicBool::new(false);
    fn refusing_open(path: &Path) -> std::io::Result<File> {
        if REFUSE.load(Ordering::SeqCst) { Err(std::io::Error::other("refused for the test")) } else { open(path) }
    }

    #[test]
    fn a_log_that_cannot_be_reopened_is_retried_not_renamed_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("requests.jsonl");
        let numbered = |n: usize| dir.path().join(format!("requests.jsonl.{n}"));
        // Each line is ~350 bytes: the third line passes 1000 and rotates.
        let mut writer = Writer::new(path.clone(), 1000, 3, refusing_open).unwrap();
        REFUSE.store(true, Ordering::SeqCst);
        for n in 0..3 {
            writer.write(&line(n));
        }
        assert!(numbered(1).exists() && !path.exists(), "rotated, and the new file could not be opened");
        // Every later line goes to the file still open; no further rename
        // shifts (and so deletes) the rotated files.
        for n in 3..30 {
            writer.write(&line(n));
        }
        assert!(!numbered(2).exists(), "a rename chain ran again while the reopen was failing");
        assert_eq!(lines(&numbered(1)), 30, "no line was lost");
        // The reopen is retried (once a second in `run`), and works again.
        REFUSE.store(false, Ordering::SeqCst);
        writer.reopen();
        writer.write(&line(30));
        assert_eq!(lines(&path), 1);
    }
}
