//! `lmtp-throughput`: mail in over LMTP: delivery throughput with concurrent senders, the
//! latency to each 250, and push latency from that 250 to a watching client's disk.
//!
//! Starts a server in this process with an LMTP listener on loopback, generates the corpus
//! in memory (not timed; converted to CRLF and dot-stuffed, as an MTA sends it), then:
//!
//! 1. **Throughput.** `--senders` LMTP sessions (TCP) deliver `--messages` messages between
//!    them, one transaction per message (MAIL, RCPT, DATA), to one account. Per message it
//!    records the time from the end of DATA (`.` sent) to the `250`, which the server sends
//!    only once blob and Store record are durable, and the whole transaction's time.
//!    Afterwards the account's Head must equal the message count.
//! 2. **Push.** Another account, watched by a `postlog sync --watch` process (the `postlog`
//!    binary next to this one, or `--postlog`). One LMTP session delivers `--push` messages
//!    one at a time; for each, the time from the `250` to the message's file appearing in the
//!    watcher's `new/` (looked for every 50 µs).
//!
//! Server, senders and watcher share the machine's cores.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail, ensure};
use clap::Parser;
use postlog_bench::LatencySummary;
use postlog_client::{Endpoint, LoginUrl, Profile};
use postlog_server::{Server, StartOptions};
use postlog_store::Accounts;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

/// Measure LMTP delivery throughput, latency to 250, and push latency to a watcher's disk.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Messages delivered in the throughput phase.
    #[arg(long, default_value_t = 4000)]
    messages: usize,
    /// Concurrent LMTP sessions in the throughput phase.
    #[arg(long, default_value_t = 8)]
    senders: usize,
    /// Messages delivered one at a time in the push phase (0: skip it).
    #[arg(long, default_value_t = 200)]
    push: usize,
    /// Pause between push-phase messages, in milliseconds.
    #[arg(long, default_value_t = 20)]
    gap_ms: u64,
    /// Server data directory [default: a fresh temporary directory, removed afterwards].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Corpus seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The `postlog` binary that runs the watching client [default: next to this binary].
    #[arg(long)]
    postlog: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        args.messages > 0 && args.senders > 0,
        "--messages and --senders must be at least 1"
    );
    let postlog = match &args.postlog {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no directory for this binary")?
            .join("postlog"),
    };
    ensure!(
        args.push == 0 || postlog.is_file(),
        "{} missing: build it (cargo build --release -p postlog) or pass --postlog",
        postlog.display()
    );
    let tmp = tempfile::tempdir().context("creating a temporary directory")?;
    let data = match &args.data {
        Some(d) => d.clone(),
        None => tmp.path().join("data"),
    };
    std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;

    let started = Instant::now();
    let corpus: Vec<Vec<u8>> = postlog_bench::generate(args.seed, args.messages + args.push)
        .map(|m| to_smtp_data(&m))
        .collect();
    let corpus = Arc::new(corpus);
    let bytes: u64 = corpus[..args.messages].iter().map(|m| m.len() as u64).sum();
    println!(
        "corpus: {} + {} messages, {:.1} MB in the throughput phase (seed {}), prepared in {:.1} s",
        args.messages,
        args.push,
        bytes as f64 / 1e6,
        args.seed,
        started.elapsed().as_secs_f64()
    );

    // Fresh account names, so a reused --data directory still gets new mail.
    let run_id = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis();
    let (bulk, push) = (format!("bulk-{run_id}"), format!("push-{run_id}"));
    let mut accounts = Accounts::open(&data)?;
    let bulk_creds = accounts.add_device(&bulk, &[format!("{bulk}@bench.test")], "bench")?;
    let push_creds = accounts.add_device(&push, &[format!("{push}@bench.test")], "watch")?;
    drop(accounts);

    let server = Server::start_with(
        &data,
        StartOptions {
            listen: Some(([127, 0, 0, 1], 0).into()),
            lmtp: Some(([127, 0, 0, 1], 0).into()),
            ..Default::default()
        },
    )
    .context("starting the server")?;
    let quic = server.local_addr()?;
    let lmtp = server.lmtp_addr().context("no LMTP listener")?;
    let fingerprint = server.fingerprint().to_owned();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    let login = |c: postlog_store::DeviceCredentials| LoginUrl {
        account: c.account,
        server: quic.to_string(),
        device: c.device,
        secret: c.secret,
        fingerprint: fingerprint.clone(),
    };

    // 1. Throughput.
    let rcpt = format!("{bulk}@bench.test");
    let next = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let mut senders = JoinSet::new();
    for _ in 0..args.senders {
        let (corpus, next, rcpt, n) = (corpus.clone(), next.clone(), rcpt.clone(), args.messages);
        senders.spawn(async move {
            let mut s = Lmtp::connect(lmtp).await?;
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let start = Instant::now();
                let to_250 = s.deliver(&rcpt, &corpus[i]).await?;
                out.push((to_250, start.elapsed()));
            }
            s.quit().await;
            anyhow::Ok(out)
        });
    }
    let (mut to_250, mut txn) = (Vec::new(), Vec::new());
    while let Some(r) = senders.join_next().await {
        for (a, b) in r?? {
            to_250.push(a);
            txn.push(b);
        }
    }
    let elapsed = t0.elapsed();
    let endpoint = Endpoint::new(&fingerprint)?;
    let conn = endpoint.connect(&login(bulk_creds)).await?;
    let head = conn.head().await?;
    conn.close();
    ensure!(
        head == args.messages as u64,
        "the account has Head {head} after {} acknowledged deliveries",
        args.messages
    );
    let l250 = LatencySummary::of(&mut to_250).context("nothing delivered")?;
    let ltx = LatencySummary::of(&mut txn).context("nothing delivered")?;
    let secs = elapsed.as_secs_f64();
    println!(
        "throughput: {} senders, {} messages in {secs:.2} s: {:.0} msg/s, {:.1} MB/s",
        args.senders,
        args.messages,
        args.messages as f64 / secs,
        bytes as f64 / 1e6 / secs
    );
    println!(
        "end of DATA -> 250, ms: p50 {:.2}  p99 {:.2}  max {:.2}",
        ms(l250.p50),
        ms(l250.p99),
        ms(l250.max)
    );
    println!(
        "MAIL -> 250 (whole transaction), ms: p50 {:.2}  p99 {:.2}  max {:.2}",
        ms(ltx.p50),
        ms(ltx.p99),
        ms(ltx.max)
    );
    let mut summary = format!(
        "summary senders={} msgs={} msg_per_s={:.0} mb_per_s={:.1} to250_p50={:.3} to250_p99={:.3}",
        args.senders,
        args.messages,
        args.messages as f64 / secs,
        bytes as f64 / 1e6 / secs,
        ms(l250.p50),
        ms(l250.p99)
    );

    // 2. Push.
    if args.push > 0 {
        let profile_dir = tmp.path().join("watch");
        let profile = Profile::create(&profile_dir, login(push_creds), None)?;
        let mut watcher = Watcher::spawn(&postlog, &profile_dir, &tmp.path().join("watch.log"))?;
        let new_dir = profile.maildir.join("new");
        let rcpt = format!("{push}@bench.test");
        let mut s = Lmtp::connect(lmtp).await?;
        let mut after_250 = Vec::new();
        for i in args.messages..args.messages + args.push {
            let before = count_entries(&new_dir);
            let dir = new_dir.clone();
            let poller = tokio::task::spawn_blocking(move || {
                let deadline = Instant::now() + Duration::from_secs(10);
                while Instant::now() < deadline {
                    if count_entries(&dir) > before {
                        return Some(Instant::now());
                    }
                    std::thread::sleep(Duration::from_micros(50));
                }
                None
            });
            s.deliver(&rcpt, &corpus[i]).await?;
            let acked = Instant::now();
            let Some(present) = poller.await? else {
                watcher.check()?;
                bail!(
                    "message {i} did not reach {} within 10 s",
                    new_dir.display()
                );
            };
            after_250.push(if present >= acked {
                ms(present - acked)
            } else {
                -ms(acked - present)
            });
            tokio::time::sleep(Duration::from_millis(args.gap_ms)).await;
        }
        s.quit().await;
        watcher.check()?;
        after_250.sort_by(f64::total_cmp);
        let (p50, p99) = (rank(&after_250, 50), rank(&after_250, 99));
        let max = after_250.last().copied().unwrap_or(f64::NAN);
        println!(
            "push: 250 -> file in the watcher's new/, ms ({} messages): p50 {p50:.2}  p99 {p99:.2}  max {max:.2}",
            after_250.len()
        );
        summary.push_str(&format!(" push_p50={p50:.3} push_p99={p99:.3}"));
    }
    println!("{summary}");
    let _ = stop.send(());
    serving.await?;
    Ok(())
}

/// A message as an SMTP client sends it after DATA: CRLF line ends, leading dots doubled,
/// and the terminating `.` line.
fn to_smtp_data(msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(msg.len() + msg.len() / 40 + 8);
    let body = msg.strip_suffix(b"\n").unwrap_or(msg);
    for line in body.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.first() == Some(&b'.') {
            out.push(b'.');
        }
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// One LMTP session.
struct Lmtp {
    r: BufReader<tokio::net::tcp::OwnedReadHalf>,
    w: tokio::net::tcp::OwnedWriteHalf,
    line: String,
}

impl Lmtp {
    async fn connect(addr: std::net::SocketAddr) -> anyhow::Result<Lmtp> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let (r, w) = tcp.into_split();
        let mut s = Lmtp {
            r: BufReader::new(r),
            w,
            line: String::new(),
        };
        s.expect(220).await?;
        s.w.write_all(b"LHLO bench.test\r\n").await?;
        s.expect(250).await?;
        Ok(s)
    }

    /// Reads one (possibly multi-line) reply and checks its code.
    async fn expect(&mut self, code: u16) -> anyhow::Result<()> {
        loop {
            self.line.clear();
            if self.r.read_line(&mut self.line).await? == 0 {
                bail!("the LMTP server closed the connection");
            }
            let got: u16 = self.line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
            if got != code {
                bail!("expected {code}, got {:?}", self.line.trim_end());
            }
            if self.line.as_bytes().get(3) != Some(&b'-') {
                return Ok(());
            }
        }
    }

    /// Delivers one message (already in DATA form) to one recipient; returns the time from
    /// the end of DATA to the 250.
    async fn deliver(&mut self, rcpt: &str, data: &[u8]) -> anyhow::Result<Duration> {
        self.w
            .write_all(
                format!("MAIL FROM:<bench@sender.test>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n").as_bytes(),
            )
            .await?;
        self.expect(250).await?;
        self.expect(250).await?;
        self.expect(354).await?;
        self.w.write_all(data).await?;
        let sent = Instant::now();
        self.expect(250).await?;
        Ok(sent.elapsed())
    }

    async fn quit(&mut self) {
        let _ = self.w.write_all(b"QUIT\r\n").await;
    }
}

/// A `postlog sync --watch` child process, stopped on drop.
struct Watcher {
    child: Child,
    log: PathBuf,
}

impl Watcher {
    fn spawn(postlog: &Path, profile: &Path, log: &Path) -> anyhow::Result<Watcher> {
        let err = std::fs::File::create(log)?;
        let child = Command::new(postlog)
            .args(["sync", "--watch", "--profile"])
            .arg(profile)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {}", postlog.display()))?;
        let mut w = Watcher {
            child,
            log: log.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !std::fs::read_to_string(log)
            .unwrap_or_default()
            .contains("connected")
        {
            w.check()?;
            ensure!(
                Instant::now() < deadline,
                "postlog sync --watch did not connect"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(w)
    }

    /// Fails, with the watcher's log, when it exited.
    fn check(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "postlog sync --watch exited ({status}):\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
        Ok(())
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn count_entries(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Nearest-rank percentile of sorted, non-empty samples.
fn rank(sorted: &[f64], percent: usize) -> f64 {
    let r = (percent * sorted.len()).div_ceil(100).max(1);
    sorted[r - 1]
}
