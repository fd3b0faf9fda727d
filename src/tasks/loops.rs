//! Event loops: threads that each run a single-threaded tokio runtime and
//! serve the client connections handed to them (`[server] event_loops`).
//!
//! With tokio's work-stealing workers, a connection's task may run on any
//! worker, and an idle worker is woken whenever work appears somewhere: on a
//! small box shared with other processes those wake-ups cost more than they
//! balance. On an event loop a connection lives its whole life on one
//! thread: its task, its timers and its socket's readiness never cross cores,
//! and a loop with nothing to do sleeps in `epoll_wait` until its own sockets
//! wake it. New connections are dealt out in turn, which balances many
//! similar connections well and a few very unequal ones poorly (the reason
//! the work-stealing runtime stays the default).
//!
//! Each loop thread knows its number ([`current`]), so per-thread resources
//! can be kept per loop: sluice's HTTP/1.1 and HTTP/2 upstream pools and the
//! Redis connections are (a socket's readiness is reported to the loop that
//! opened it). hyper-util's client (TLS HTTP/1.1 upstreams, streamed
//! uploads) is still one for all loops.

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::runtime::{Builder, Handle};
use tokio::sync::oneshot;

/// How long a stopping loop waits for its blocking work (a DNS lookup in
/// flight) before it is left behind.
const BLOCKING_WAIT: Duration = Duration::from_secs(1);
/// Threads a loop may start for blocking work (DNS lookups of upstream and
/// Redis hosts); tokio's default of 512 a runtime is far more than a loop's
/// lookups need, times the loops.
const BLOCKING_THREADS: usize = 16;

thread_local! {
    /// 0 off the event loops; `n + 1` on loop `n`.
    static CURRENT: Cell<usize> = const { Cell::new(0) };
}

/// Which event loop runs the calling thread: 0 on any other thread (the
/// runtime's workers, tests), `n + 1` on loop `n`.
pub fn current() -> usize {
    CURRENT.with(Cell::get)
}

/// Runs `f` as if the calling thread were loop `n`'s (tests of per-loop
/// resources without starting loops).
#[cfg(test)]
pub(crate) fn as_loop<R>(n: usize, f: impl FnOnce() -> R) -> R {
    let before = CURRENT.with(|current| current.replace(n + 1));
    let result = f();
    CURRENT.with(|current| current.set(before));
    result
}

/// The calling thread's own of `per_loop`: a resource kept once for the
/// runtime's workers (index 0) and once for each loop (`n + 1`).
pub fn here<T>(per_loop: &[T]) -> &T {
    let here = current();
    debug_assert!(here < per_loop.len(), "loop {here} has nothing of its own here");
    &per_loop[here % per_loop.len()]
}

/// One loop: where to spawn on it, how to stop it, its thread.
struct Loop {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// A set of event loops. Dropping it stops them without waiting;
/// [`EventLoops::stop`] also waits for their threads.
pub struct EventLoops {
    loops: Vec<Loop>,
    next: AtomicUsize,
}

impl std::fmt::Debug for EventLoops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoops").field("loops", &self.loops.len()).finish_non_exhaustive()
    }
}

impl EventLoops {
    /// Starts `count` loops (at least one), threads named `sluice-loop-N`.
    pub fn start(count: usize) -> std::io::Result<Self> {
        let mut loops = Vec::with_capacity(count.max(1));
        for n in 0..count.max(1) {
            let (stop, stopped) = oneshot::channel::<()>();
            let (started, handle) = std::sync::mpsc::sync_channel(1);
            // The runtime is built on its own thread and dropped there: a
            // runtime dropped on the caller's (async) thread would panic.
            let thread = std::thread::Builder::new().name(format!("sluice-loop-{n}")).spawn(move || {
                let runtime =
                    match Builder::new_current_thread().enable_all().max_blocking_threads(BLOCKING_THREADS).build() {
                        Ok(runtime) => runtime,
                        Err(error) => {
                            let _ = started.send(Err(error));
                            return;
                        }
                    };
                let _ = started.send(Ok(runtime.handle().clone()));
                CURRENT.with(|current| current.set(n + 1));
                // A dropped sender stops the loop as well as a sent stop.
                let _ = runtime.block_on(stopped);
                // Whatever is still spawned here is dropped (the drain
                // finished or cut every connection before the stop).
                runtime.shutdown_timeout(BLOCKING_WAIT);
            })?;
            // A blocking wait, at start-up only: the thread answers as soon
            // as its runtime is built.
            let handle = handle.recv().map_err(|_| std::io::Error::other("an event loop thread ended at start"))??;
            loops.push(Loop { handle, stop: Some(stop), thread: Some(thread) });
        }
        Ok(Self { loops, next: AtomicUsize::new(0) })
    }

    /// How many loops there are.
    pub fn count(&self) -> usize {
        self.loops.len()
    }

    /// Hands `stream` to the next loop in turn, where `serve` runs with it
    /// (registered with that loop's reactor), and returns that loop's index
    /// (`serve` sees it as [`current`] - 1). If the stream cannot leave this
    /// runtime, `serve` is dropped unrun and the failure returned; if it
    /// cannot join the loop's, that is logged there; if the loop has already
    /// stopped (only after the drain), the task is dropped unrun.
    pub fn hand_over<F, Fut>(&self, stream: TcpStream, serve: F) -> std::io::Result<usize>
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let index = self.next.fetch_add(1, Relaxed) % self.loops.len();
        let stream = stream.into_std()?;
        self.loops[index].handle.spawn(async move {
            match TcpStream::from_std(stream) {
                Ok(stream) => serve(stream).await,
                Err(error) => tracing::warn!(%error, "an event loop cannot take a connection; closed"),
            }
        });
        Ok(index)
    }

    /// Tells every loop to stop (whatever still runs on it is dropped).
    fn signal_stop(&mut self) {
        for l in &mut self.loops {
            if let Some(stop) = l.stop.take() {
                let _ = stop.send(());
            }
        }
    }

    /// Stops every loop (dropping whatever still runs on it) and waits for
    /// their threads to end.
    pub async fn stop(mut self) {
        self.signal_stop();
        let threads: Vec<JoinHandle<()>> = self.loops.iter_mut().filter_map(|l| l.thread.take()).collect();
        let joined = tokio::task::spawn_blocking(move || {
            threads.into_iter().map(JoinHandle::join).filter(Result::is_err).count()
        })
        .await;
        match joined {
            Ok(0) => tracing::debug!(loops = self.loops.len(), "event loops stopped"),
            Ok(panicked) => tracing::error!(panicked, "event loop threads panicked"),
            Err(error) => tracing::error!(%error, "could not wait for the event loops"),
        }
    }
}

impl Drop for EventLoops {
    fn drop(&mut self) {
        self.signal_stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each connection runs on the loop it was dealt to, in turn, and `stop`
    /// returns only once the loop threads are gone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_are_dealt_out_in_turn_and_stop_joins_the_threads() {
        let loops = EventLoops::start(2).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
        for i in 0..4 {
            let _client = TcpStream::connect(addr).await.unwrap();
            let (stream, _) = listener.accept().await.unwrap();
            let seen_tx = seen_tx.clone();
            let dealt = loops.hand_over(stream, move |stream| async move {
                let thread = std::thread::current();
                let _ = seen_tx.send((i, current(), thread.name().map(str::to_owned), stream.peer_addr().is_ok()));
            });
            assert_eq!(dealt.unwrap(), i % 2);
        }
        let mut got = Vec::new();
        for _ in 0..4 {
            got.push(seen.recv().await.unwrap());
        }
        got.sort();
        let on = |i: usize, n: usize| (i, n + 1, Some(format!("sluice-loop-{n}")), true);
        assert_eq!(
            got,
            vec![on(0, 0), on(1, 1), on(2, 0), on(3, 1)],
            "in turn, each on its own thread, the stream usable there"
        );
        assert_eq!(current(), 0, "a runtime worker is on no loop");

        let handles = loops.loops.iter().map(|l| l.handle.clone()).collect::<Vec<_>>();
        loops.stop().await;
        for handle in handles {
            assert!(handle.spawn(async {}).await.is_err(), "a stopped loop runs nothing more: its runtime is gone");
        }
    }
}
