//! Test harness: real servers (in-process or as the `postlog` binary) on loopback, real
//! clients, generated mail.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use postlog_client::{Endpoint, LoginUrl};
use postlog_server::{Server, StartOptions};

/// The `postlog` binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_postlog")
}

/// A UDP port for a server that was free a moment ago, below the ephemeral range
/// (`postlog_net::port_below_ephemeral`: a port from a bind to port 0 raced with the test's
/// own client endpoints in CI).
pub fn free_port() -> u16 {
    postlog_net::port_below_ephemeral(|p| std::net::UdpSocket::bind(("0.0.0.0", p)).is_ok())
        .expect("no free UDP port below the ephemeral range")
}

/// Whether this run uses PostgreSQL + S3 (`POSTLOG_TEST_BACKEND=postgres`, with the
/// services of `scripts/test-services.sh`) instead of the embedded store. The same tests run
/// on both; the few checks that read embedded files directly are skipped on PostgreSQL.
pub fn on_postgres() -> bool {
    std::env::var("POSTLOG_TEST_BACKEND").is_ok_and(|v| v == "postgres")
}

fn service_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: POSTLOG_TEST_BACKEND=postgres needs the test services \
             (scripts/test-services.sh start; source its env)"
        )
    })
}

/// Points a data directory at the test backend: on PostgreSQL, a fresh database and a fresh
/// bucket prefix, added to its postlog.toml as `[storage]`. Idempotent; nothing to do for
/// the embedded store. Every way the tests open a server or an account calls it.
pub fn prepare_data(data: &Path) {
    if !on_postgres() {
        return;
    }
    let path = data.join("postlog.toml");
    let existing = std::fs::read_to_string(&path).unwrap_or_default();
    if existing.contains("[storage]") {
        return;
    }
    std::fs::create_dir_all(data).unwrap();
    std::fs::write(&path, format!("{existing}\n{}", storage_toml())).unwrap();
}

/// A `[storage]` section on a new, empty database and bucket prefix.
pub fn storage_toml() -> String {
    let admin = service_env("POSTLOG_TEST_POSTGRES");
    let db = format!("postlog_t_{:016x}", rand::random::<u64>());
    let create = format!("CREATE DATABASE {db}");
    let a = admin.clone();
    // The synchronous client must not run on a runtime's thread.
    std::thread::spawn(move || {
        let mut c =
            postgres::Client::connect(&a, postgres::NoTls).expect("connect to the test PostgreSQL");
        c.batch_execute(&create).expect("create a test database");
    })
    .join()
    .unwrap();
    format!(
        "[storage]\nbackend = \"postgres\"\npostgres = \"{admin} dbname={db}\"\npool_size = 4\n\
         [storage.s3]\nendpoint = \"{}\"\nbucket = \"{}\"\nregion = \"{}\"\n\
         access_key = \"{}\"\nsecret_key = \"{}\"\nprefix = \"{db}/\"\nallow_http = true\n",
        service_env("POSTLOG_TEST_S3_ENDPOINT"),
        service_env("POSTLOG_TEST_S3_BUCKET"),
        service_env("POSTLOG_TEST_S3_REGION"),
        service_env("POSTLOG_TEST_S3_ACCESS_KEY"),
        service_env("POSTLOG_TEST_S3_SECRET_KEY"),
    )
}

/// Account administration on the data directory's backend (embedded or PostgreSQL).
pub fn admin(data: &Path) -> postlog_server::storage::Admin {
    prepare_data(data);
    postlog_server::storage::Admin::open(data).expect("open the account store")
}

/// `postlog verify` on the data directory's backend: the report and the count of
/// unreferenced objects (PostgreSQL + S3 only).
pub fn verify(data: &Path) -> postlog_store::VerifyReport {
    postlog_server::storage::verify(data).expect("verify").0
}

/// A server running in this process, stopped on drop.
pub struct InProcess {
    pub addr: SocketAddr,
    pub fingerprint: String,
    pub data: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl InProcess {
    pub async fn start(data: &Path) -> InProcess {
        Self::start_with(data, StartOptions::default()).await.0
    }

    /// With LMTP/SMTP listeners (port 0 picks a free port); returns the server and its
    /// bound (LMTP, SMTP) addresses.
    pub async fn start_with(
        data: &Path,
        mut opts: StartOptions,
    ) -> (InProcess, Option<SocketAddr>, Option<SocketAddr>) {
        opts.listen = Some("127.0.0.1:0".parse().unwrap());
        prepare_data(data);
        let server = Server::start_with(data, opts).expect("server starts");
        let mail = (server.lmtp_addr(), server.smtp_addr());
        (Self::run(server, data), mail.0, mail.1)
    }

    fn run(server: Server, data: &Path) -> InProcess {
        let addr = server.local_addr().unwrap();
        let fingerprint = server.fingerprint().to_string();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        InProcess {
            addr,
            fingerprint,
            data: data.to_owned(),
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Creates an account (or a device of it) and returns its login URL.
    pub fn account(&self, name: &str) -> LoginUrl {
        account_on(&self.data, self.addr, &self.fingerprint, name)
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

pub fn account_on(data: &Path, addr: SocketAddr, fingerprint: &str, name: &str) -> LoginUrl {
    let creds = admin(data)
        .add_device(name, &[], "test")
        .expect("add device");
    LoginUrl {
        account: creds.account,
        server: addr.to_string(),
        device: creds.device,
        secret: creds.secret,
        fingerprint: fingerprint.to_string(),
    }
}

/// Distinct, realistic-looking messages.
pub fn message(i: usize, body_len: usize) -> Vec<u8> {
    let mut m = format!(
        "From: Sender {i} <sender{i}@example.org>\r\nTo: ann@example.org\r\n\
         Subject: Test message {i}\r\nMessage-ID: <{i}.test@example.org>\r\n\
         Date: Fri, 27 Nov 2026 12:00:00 +0000\r\n\r\n"
    )
    .into_bytes();
    let line = format!("Line of message {i}, padding the body to a realistic size.\r\n");
    while m.len() < body_len {
        m.extend_from_slice(line.as_bytes());
    }
    m
}

/// The `postlog serve` binary as a child process.
pub struct ServerProcess {
    pub child: Child,
    pub data: PathBuf,
    pub addr: SocketAddr,
}

impl ServerProcess {
    pub fn spawn(data: &Path, addr: SocketAddr) -> ServerProcess {
        Self::spawn_with(data, addr, &[])
    }

    /// With extra `postlog serve` flags, e.g. `["--lmtp", "127.0.0.1:2424"]`.
    pub fn spawn_with(data: &Path, addr: SocketAddr, extra: &[&str]) -> ServerProcess {
        prepare_data(data);
        let child = Command::new(bin())
            .args(["serve", "--data"])
            .arg(data)
            .args(["--listen", &addr.to_string()])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn postlog serve");
        ServerProcess {
            child,
            data: data.to_owned(),
            addr,
        }
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        self.child.wait().expect("wait for server")
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A TCP port for a server that was free a moment ago (see [`free_port`]).
pub fn free_tcp_port() -> u16 {
    postlog_net::port_below_ephemeral(|p| std::net::TcpListener::bind(("0.0.0.0", p)).is_ok())
        .expect("no free TCP port below the ephemeral range")
}

/// The certificate fingerprint of a data directory's server (created on first start).
pub fn fingerprint_of(data: &Path) -> String {
    let cfg = postlog_server::ServerConfig::load_or_init(data).unwrap();
    postlog_server::tls::load_or_generate(data, &cfg)
        .unwrap()
        .fingerprint()
}

/// Connects, retrying until the server answers (it may be starting up).
pub async fn connect_retry(endpoint: &Endpoint, login: &LoginUrl) -> postlog_client::Connection {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match endpoint.connect(login).await {
            Ok(c) => return c,
            Err(e) if tokio::time::Instant::now() < deadline && e.is_retryable() => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("cannot connect to the server: {e}"),
        }
    }
}

/// Runs the CLI and returns (exit status, stdout, stderr).
pub fn run_cli(args: &[&str], env: &[(&str, &Path)]) -> (std::process::ExitStatus, String, String) {
    let mut cmd = Command::new(bin());
    cmd.args(args).env("RUST_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run postlog");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A CA and a server certificate for 127.0.0.1 and localhost signed by it: (CA PEM, server
/// certificate PEM, server key PEM).
pub fn private_ca() -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Postlog test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

/// Every file under `root` whose name or bytes contain one of `needles`.
pub fn traces(root: &Path, needles: &[&[u8]]) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    let mut dirs = vec![root.to_owned()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let path = e.path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let bytes = std::fs::read(&path).unwrap_or_default();
            let name = path.to_string_lossy().into_owned();
            if needles.iter().any(|n| {
                name.contains(&*String::from_utf8_lossy(n))
                    || bytes.windows(n.len()).any(|w| w == *n)
            }) {
                hits.push(path);
            }
        }
    }
    hits
}

/// Runs the CLI and asserts it succeeded; returns its stdout followed by its stderr.
pub fn cli(args: &[&str]) -> String {
    let out = Command::new(bin())
        .args(args)
        .env("POSTLOG_CONNECT_TIMEOUT", "1")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "postlog {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// Every message file in a Maildir's `cur/` and `new/` (a missing one counts as empty),
/// each checked to hash to the name it starts with: the hashes, and how many files
/// repeated a hash already seen.
pub fn maildir_contents(root: &Path) -> (std::collections::HashSet<postlog_proto::BlobHash>, u64) {
    use postlog_proto::BlobHash;
    let mut out = std::collections::HashSet::new();
    let mut dups = 0;
    for sub in ["cur", "new"] {
        let Ok(dir) = std::fs::read_dir(root.join(sub)) else {
            continue;
        };
        for e in dir {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            let hash: BlobHash = name[..64].parse().unwrap();
            assert_eq!(
                BlobHash::of(&std::fs::read(e.path()).unwrap()),
                hash,
                "{name}"
            );
            if !out.insert(hash) {
                dups += 1;
            }
        }
    }
    (out, dups)
}

/// [`maildir_contents`], failing on a duplicate file.
pub fn maildir_hashes(root: &Path) -> std::collections::HashSet<postlog_proto::BlobHash> {
    let (out, dups) = maildir_contents(root);
    assert_eq!(dups, 0, "duplicate files in {}", root.display());
    out
}

pub fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// The file of message `h` in a Maildir: (`cur` or `new`, file name).
pub fn file_of(mail: &Path, h: &postlog_proto::BlobHash) -> (String, String) {
    for sub in ["cur", "new"] {
        for e in std::fs::read_dir(mail.join(sub)).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            if name.starts_with(&h.to_hex()) {
                return (sub.to_string(), name);
            }
        }
    }
    panic!("no file for {h}");
}

/// A message's tags on a replica, as `postlog tag HASH` prints them (stdout, one a line).
pub fn tags(profile: &Path, h: &postlog_proto::BlobHash) -> std::collections::BTreeSet<String> {
    let out = Command::new(bin())
        .args(["tag", "--profile", p(profile), &h.to_hex()])
        .env("POSTLOG_CONNECT_TIMEOUT", "1")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "postlog tag failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

pub fn set(v: &[&str]) -> std::collections::BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// One row of docs/RELIABILITY.md, printed as a machine-readable line that
/// `scripts/reliability.sh` collects (run the test with `--nocapture`). A test that reaches
/// this line did not panic; a panic fails the test, and the script records it.
pub fn reliability(
    test: &str,
    what: &str,
    trials: u64,
    acknowledged: u64,
    lost: u64,
    duplicated: u64,
    diverged: u64,
) {
    println!(
        "RELIABILITY\t{test}\t{what}\t{trials}\t{acknowledged}\t{lost}\t{duplicated}\t{diverged}"
    );
}
