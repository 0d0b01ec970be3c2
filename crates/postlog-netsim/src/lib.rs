//! A loopback network impairment harness for tests and benchmarks.
//!
//! The kernel on the project's machines has no `netem` qdisc, so latency and loss come from
//! user space: [`UdpProxy`] sits between a QUIC client and server (the client connects to the
//! proxy's address; the server's pinned certificate is unaffected) and forwards datagrams in
//! both directions with the [`Impairment`] it was given: one-way delay, jitter, loss,
//! duplication, reordering and blackout windows. [`TcpProxy`] adds a one-way delay to a TCP
//! connection (for the IMAP comparison benchmark).
//!
//! Every random decision comes from one [`SplitMix64`] seeded with [`Impairment::seed`]:
//! the same seed and the same sequence of datagrams give the same fates. (Thread scheduling
//! can change the order in which datagrams reach the proxy; the seed fixes the decisions, not
//! the kernel.) [`Stats`] counts what happened to every datagram, and the proxy can record
//! the client's datagrams for a replay ([`UdpProxy::recorded`], [`replay`]).
//!
//! Architecture invariant: the proxy only forwards bytes; it never parses QUIC.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Largest datagram the proxy forwards (the largest UDP payload).
pub const MAX_DATAGRAM: usize = 65_535;

/// A small, fast, reproducible random number generator (SplitMix64). Used instead of a
/// crate's generator so that a seed means the same decisions in every version.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.next_f64() < p
    }

    /// Uniform in [0, max].
    pub fn duration_up_to(&mut self, max: Duration) -> Duration {
        if max.is_zero() {
            return Duration::ZERO;
        }
        max.mul_f64(self.next_f64())
    }
}

/// A window, relative to the proxy's start, in which every datagram is dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Blackout {
    pub start: Duration,
    pub len: Duration,
}

/// What the proxy does to each datagram, in each direction.
#[derive(Clone, Debug, PartialEq)]
pub struct Impairment {
    /// One-way delay (the round-trip time is twice this, plus the hosts' own time).
    pub delay: Duration,
    /// Each datagram waits an extra uniform [0, jitter]. Jitter reorders datagrams.
    pub jitter: Duration,
    /// Probability that a datagram is dropped.
    pub loss: f64,
    /// Probability that a datagram is delivered twice.
    pub duplicate: f64,
    /// Probability that a datagram is held back by `reorder_delay`, so later ones pass it.
    pub reorder: f64,
    pub reorder_delay: Duration,
    /// Windows (from the proxy's start) in which every datagram is dropped.
    pub blackouts: Vec<Blackout>,
    pub seed: u64,
}

impl Default for Impairment {
    fn default() -> Self {
        Impairment {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            reorder_delay: Duration::ZERO,
            blackouts: Vec::new(),
            seed: 1,
        }
    }
}

impl Impairment {
    /// A clean link with this round-trip time (half of it each way).
    pub fn rtt(rtt: Duration) -> Impairment {
        Impairment {
            delay: rtt / 2,
            ..Impairment::default()
        }
    }

    /// The fate of one datagram: the delays after which its copies are delivered (empty:
    /// dropped), and why. `since_start` places it relative to the blackout windows.
    pub fn fate(&self, rng: &mut SplitMix64, since_start: Duration) -> Fate {
        if self
            .blackouts
            .iter()
            .any(|b| since_start >= b.start && since_start < b.start + b.len)
        {
            return Fate::BlackedOut;
        }
        // Draw every decision each time, so one datagram's fate never shifts the random
        // sequence of the decisions that follow it.
        let lost = rng.chance(self.loss);
        let dup = rng.chance(self.duplicate);
        let reorder = rng.chance(self.reorder);
        let jitter = rng.duration_up_to(self.jitter);
        let jitter2 = rng.duration_up_to(self.jitter);
        if lost {
            return Fate::Lost;
        }
        let mut first = self.delay + jitter;
        if reorder {
            first += self.reorder_delay;
        }
        Fate::Deliver {
            after: first,
            duplicate: dup.then_some(self.delay + jitter2),
            reordered: reorder,
        }
    }
}

/// What happens to one datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    Lost,
    BlackedOut,
    Deliver {
        after: Duration,
        /// A second copy, delivered after this long.
        duplicate: Option<Duration>,
        reordered: bool,
    },
}

/// Counters of a proxy, both directions together.
#[derive(Debug, Default)]
pub struct Stats {
    pub received: AtomicU64,
    /// Copies handed to the socket (including any it refused: see `send_errors`).
    pub delivered: AtomicU64,
    pub bytes: AtomicU64,
    pub lost: AtomicU64,
    pub blacked_out: AtomicU64,
    pub duplicated: AtomicU64,
    pub reordered: AtomicU64,
    /// Datagrams the proxy could not send on (the socket refused them).
    pub send_errors: AtomicU64,
    /// Client source addresses seen (a client that rebinds adds one).
    pub flows: AtomicU64,
}

/// A copy of [`Stats`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub received: u64,
    pub delivered: u64,
    pub bytes: u64,
    pub lost: u64,
    pub blacked_out: u64,
    pub duplicated: u64,
    pub reordered: u64,
    pub send_errors: u64,
    pub flows: u64,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            received: l(&self.received),
            delivered: l(&self.delivered),
            bytes: l(&self.bytes),
            lost: l(&self.lost),
            blacked_out: l(&self.blacked_out),
            duplicated: l(&self.duplicated),
            reordered: l(&self.reordered),
            send_errors: l(&self.send_errors),
            flows: l(&self.flows),
        }
    }
}

impl std::fmt::Display for StatsSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "flows={} datagrams={} delivered={} bytes={} lost={} blacked_out={} duplicated={} \
             reordered={}",
            self.flows,
            self.received,
            self.delivered,
            self.bytes,
            self.lost,
            self.blacked_out,
            self.duplicated,
            self.reordered
        )
    }
}

/// A datagram the client sent, as recorded by the proxy.
#[derive(Clone, Debug)]
pub struct Datagram {
    /// The client's address (one per client socket: a rebind is a new source).
    pub from: SocketAddr,
    pub bytes: Vec<u8>,
}

struct Shared {
    impairment: Impairment,
    rng: Mutex<SplitMix64>,
    start: Instant,
    /// Blackouts started at run time ([`UdpProxy::blackout`]): (from, until).
    manual: Mutex<Vec<(Instant, Instant)>>,
    stats: Stats,
    recording: AtomicBool,
    recorded: Mutex<Vec<Datagram>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these small locks leaves valid data behind.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn fate(&self) -> Fate {
        let now = Instant::now();
        if lock(&self.manual)
            .iter()
            .any(|(from, until)| now >= *from && now < *until)
        {
            return Fate::BlackedOut;
        }
        let mut rng = lock(&self.rng);
        self.impairment.fate(&mut rng, now - self.start)
    }

    /// Decides a datagram's fate and hands its copies to a direction's scheduler.
    fn route(&self, bytes: &[u8], out: &mpsc::UnboundedSender<(Instant, Vec<u8>)>) {
        self.stats.received.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        match self.fate() {
            Fate::Lost => {
                self.stats.lost.fetch_add(1, Ordering::Relaxed);
            }
            Fate::BlackedOut => {
                self.stats.blacked_out.fetch_add(1, Ordering::Relaxed);
            }
            Fate::Deliver {
                after,
                duplicate,
                reordered,
            } => {
                if reordered {
                    self.stats.reordered.fetch_add(1, Ordering::Relaxed);
                }
                let _ = out.send((now + after, bytes.to_vec()));
                if let Some(after) = duplicate {
                    self.stats.duplicated.fetch_add(1, Ordering::Relaxed);
                    let _ = out.send((now + after, bytes.to_vec()));
                }
            }
        }
    }
}

/// Delivers datagrams at their times, in time order (first come first out at equal times).
async fn scheduler(
    mut rx: mpsc::UnboundedReceiver<(Instant, Vec<u8>)>,
    socket: Arc<UdpSocket>,
    dest: Option<SocketAddr>,
    shared: Arc<Shared>,
) {
    let mut heap: BinaryHeap<Reverse<(Instant, u64, Vec<u8>)>> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut open = true;
    loop {
        while let Some(Reverse((at, _, _))) = heap.peek() {
            if *at > Instant::now() {
                break;
            }
            let Some(Reverse((_, _, bytes))) = heap.pop() else {
                break;
            };
            // Counted before the send, so a receiver that sees the datagram sees the count.
            shared.stats.delivered.fetch_add(1, Ordering::Relaxed);
            shared
                .stats
                .bytes
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            let sent = match dest {
                Some(d) => socket.send_to(&bytes, d).await,
                None => socket.send(&bytes).await,
            };
            if sent.is_err() {
                shared.stats.send_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        if !open && heap.is_empty() {
            return;
        }
        let next = heap.peek().map(|Reverse((at, _, _))| *at);
        tokio::select! {
            biased;
            m = rx.recv(), if open => match m {
                Some((at, bytes)) => {
                    seq += 1;
                    heap.push(Reverse((at, seq, bytes)));
                }
                None => open = false,
            },
            _ = sleep_until_opt(next) => {}
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A UDP proxy on 127.0.0.1 in front of one server. Each client source address gets its own
/// upstream socket, so a client that rebinds appears to the server as a new address (QUIC
/// connection migration through the proxy). Stops when dropped.
pub struct UdpProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl UdpProxy {
    /// Binds 127.0.0.1:0 and forwards to `upstream` with `impairment`.
    pub async fn start(upstream: SocketAddr, impairment: Impairment) -> std::io::Result<UdpProxy> {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let addr = front.local_addr()?;
        let shared = Arc::new(Shared {
            rng: Mutex::new(SplitMix64::new(impairment.seed)),
            impairment,
            start: Instant::now(),
            manual: Mutex::new(Vec::new()),
            stats: Stats::default(),
            recording: AtomicBool::new(false),
            recorded: Mutex::new(Vec::new()),
        });
        let tasks = Arc::new(Mutex::new(Vec::new()));
        let main = tokio::spawn(front_loop(front, upstream, shared.clone(), tasks.clone()));
        lock(&tasks).push(main);
        Ok(UdpProxy {
            addr,
            shared,
            tasks,
        })
    }

    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// Drops every datagram, both ways, for `len` from now.
    pub fn blackout(&self, len: Duration) {
        let now = Instant::now();
        lock(&self.shared.manual).push((now, now + len));
    }

    /// Starts or stops recording the datagrams clients send (before any impairment).
    pub fn record(&self, on: bool) {
        self.shared.recording.store(on, Ordering::SeqCst);
    }

    /// The recorded client datagrams, in arrival order; clears the recording.
    pub fn recorded(&self) -> Vec<Datagram> {
        std::mem::take(&mut *lock(&self.shared.recorded))
    }
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
    }
}

struct Flow {
    to_server: mpsc::UnboundedSender<(Instant, Vec<u8>)>,
}

async fn front_loop(
    front: Arc<UdpSocket>,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
) {
    let mut flows: HashMap<SocketAddr, Flow> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, from) = match front.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                // ICMP errors from a vanished client surface here on Linux; keep serving.
                tracing::trace!(error = %e, "proxy: receive");
                continue;
            }
        };
        let bytes = &buf[..n];
        if shared.recording.load(Ordering::SeqCst) {
            lock(&shared.recorded).push(Datagram {
                from,
                bytes: bytes.to_vec(),
            });
        }
        let flow = match flows.entry(from) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                match new_flow(&front, upstream, from, &shared).await {
                    Ok((flow, handles)) => {
                        lock(&tasks).extend(handles);
                        v.insert(flow)
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "proxy: cannot open an upstream socket");
                        continue;
                    }
                }
            }
        };
        shared.route(bytes, &flow.to_server);
    }
}

async fn new_flow(
    front: &Arc<UdpSocket>,
    upstream: SocketAddr,
    client: SocketAddr,
    shared: &Arc<Shared>,
) -> std::io::Result<(Flow, Vec<JoinHandle<()>>)> {
    let up = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
    up.connect(upstream).await?;
    shared.stats.flows.fetch_add(1, Ordering::Relaxed);
    let (to_server, rx) = mpsc::unbounded_channel();
    let (to_client, rx_back) = mpsc::unbounded_channel();
    let h1 = tokio::spawn(scheduler(rx, up.clone(), None, shared.clone()));
    let h2 = tokio::spawn(scheduler(
        rx_back,
        front.clone(),
        Some(client),
        shared.clone(),
    ));
    let s = shared.clone();
    let h3 = tokio::spawn(async move {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            match up.recv(&mut buf).await {
                Ok(n) => s.route(&buf[..n], &to_client),
                Err(e) => tracing::trace!(error = %e, "proxy: upstream receive"),
            }
        }
    });
    Ok((Flow { to_server }, vec![h1, h2, h3]))
}

/// Sends `datagrams` to `to`, in order, from a fresh socket (a replaying attacker). Returns
/// the socket, so the caller can see whether anything answers.
pub async fn replay(datagrams: &[Datagram], to: SocketAddr) -> std::io::Result<UdpSocket> {
    let sock = UdpSocket::bind("127.0.0.1:0").await?;
    for d in datagrams {
        sock.send_to(&d.bytes, to).await?;
    }
    Ok(sock)
}

/// A TCP proxy on 127.0.0.1 that delays every byte by `delay` in each direction (so the
/// round-trip time grows by twice `delay`). Stops accepting when dropped.
pub struct TcpProxy {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl TcpProxy {
    pub async fn start(upstream: SocketAddr, delay: Duration) -> std::io::Result<TcpProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(pump(cr, sw, delay), pump(sr, cw, delay));
                });
            }
        });
        Ok(TcpProxy { addr, task })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` to `to`, each chunk `delay` after it was read, in order.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = async move {
        while let Some((at, bytes)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx
                        .send((Instant::now() + delay, buf[..n].to_vec()))
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    };
    tokio::join!(reader, writer);
}

#[cfg(test)]
mod tests;
