//! login, sync, import, status.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Context;
use postlog_client::sync::{self, Progress};
use postlog_client::{ClientError, Endpoint, LoginUrl, Maildir, Profile};

use crate::cli::{ImportImapArgs, LoginArgs, ProfileArg, SyncArgs, TagArgs, TlsArg};
use crate::progress::Bar;

fn load(p: &ProfileArg) -> anyhow::Result<Profile> {
    Ok(Profile::load(&p.dir()?)?)
}

pub async fn login(a: LoginArgs) -> anyhow::Result<ExitCode> {
    let url: LoginUrl = a.url.parse()?;
    let dir = a.profile.dir()?;
    let endpoint = Endpoint::new(&url.fingerprint)?;
    match endpoint.connect(&url).await {
        Ok(conn) => {
            eprintln!(
                "connected to {} as {} (head {})",
                url.server, url.account, conn.head_at_auth
            );
            conn.close();
        }
        Err(e @ ClientError::Unreachable { .. }) => {
            eprintln!("warning: {e}; saving the profile anyway, sync will connect later");
        }
        Err(e) => return Err(e).context("login refused; the profile was not saved"),
    }
    let notmuch = match a.notmuch {
        Some(root) => Some(notmuch_root(root)?),
        None => None,
    };
    let profile = Profile::create_with(&dir, url, a.maildir, notmuch)?;
    Maildir::open(&profile.maildir)?;
    eprintln!(
        "profile saved in {}; Maildir at {}",
        dir.display(),
        profile.maildir.display()
    );
    if let Some(root) = &profile.notmuch {
        eprintln!(
            "synced mail is indexed in the notmuch database at {}",
            root.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The notmuch mail root for `login --notmuch [DIR]`, checked to hold a database.
#[cfg(feature = "notmuch")]
fn notmuch_root(dir: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    use postlog_client::notmuch;
    let root = match dir {
        Some(d) => d,
        None => notmuch::default_root()
            .context("no notmuch database found; name its directory: --notmuch DIR")?,
    };
    notmuch::check(&root).with_context(|| {
        format!(
            "no usable notmuch database in {} (create one with `notmuch setup` or `notmuch new`)",
            root.display()
        )
    })?;
    Ok(root)
}

#[cfg(not(feature = "notmuch"))]
fn notmuch_root(_: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    anyhow::bail!(
        "this postlog was built without notmuch support; build it with \
         `cargo build --release -p postlog --features notmuch`"
    )
}

pub async fn sync(a: SyncArgs) -> anyhow::Result<ExitCode> {
    let profile = load(&a.profile)?;
    let endpoint = Endpoint::new(&profile.login.fingerprint)?;
    let progress = Arc::new(Progress::default());
    if a.watch {
        let shutdown = crate::server_cmds::shutdown_signal();
        let p = progress.clone();
        let status = move |s: &str| {
            tracing::info!("{s}");
            eprintln!(
                "postlog sync --watch: {s} ({} messages so far)",
                p.messages.load(Ordering::Relaxed)
            );
        };
        sync::watch(&profile, &endpoint, progress.clone(), shutdown, status).await?;
        eprintln!(
            "stopped; {} new messages",
            progress.messages.load(Ordering::Relaxed)
        );
        return Ok(ExitCode::SUCCESS);
    }
    let (p1, p2) = (progress.clone(), progress.clone());
    let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let bar_done = received.clone();
    let p3 = progress.clone();
    let copier = tokio::spawn(async move {
        loop {
            bar_done.store(p3.received.load(Ordering::Relaxed), Ordering::Relaxed);
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    });
    let bar = Bar::start(
        a.quiet,
        "records",
        move || p1.head.load(Ordering::Relaxed),
        received,
        move || p2.start.load(Ordering::Relaxed),
    );
    let result = sync::sync_once(&profile, &endpoint, progress.clone()).await;
    bar.finish();
    copier.abort();
    let r = result?;
    let failed = progress.outbox_failed.load(Ordering::Relaxed);
    if failed > 0 {
        eprintln!(
            "warning: the server refused {failed} queued outgoing messages; they are in {}",
            profile.dir.join("outbox/failed").display()
        );
    }
    if a.quiet {
        return Ok(ExitCode::SUCCESS);
    }
    let sent = progress.outbox_sent.load(Ordering::Relaxed);
    if sent > 0 {
        print!("{sent} queued messages sent; ");
    }
    print!(
        "{} new messages, {:.1} MB, {} records, cursor {}, {:.3} s",
        r.new_messages,
        r.bytes as f64 / 1e6,
        r.records,
        r.cursor,
        r.elapsed.as_secs_f64()
    );
    if profile.notmuch.is_some() {
        print!(
            "; notmuch: {} messages read, {} written",
            r.notmuch_read, r.notmuch_written
        );
    }
    println!();
    Ok(ExitCode::SUCCESS)
}

pub async fn import_maildir(src: PathBuf, p: ProfileArg, quiet: bool) -> anyhow::Result<ExitCode> {
    let profile = load(&p)?;
    if !src.join("cur").is_dir() && !src.join("new").is_dir() {
        anyhow::bail!("{} is not a Maildir (no cur/ or new/)", src.display());
    }
    let endpoint = Endpoint::new(&profile.login.fingerprint)?;
    let conn = endpoint.connect(&profile.login).await?;
    let started = std::time::Instant::now();
    let progress = Arc::new(postlog_client::import::ImportProgress::default());
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (p1, p2, d2) = (progress.clone(), progress.clone(), done.clone());
    let copier = tokio::spawn(async move {
        loop {
            d2.store(p2.done.load(Ordering::Relaxed), Ordering::Relaxed);
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    });
    let bar = Bar::start(
        quiet,
        "messages",
        move || p1.total.load(Ordering::Relaxed),
        done,
        || 0,
    );
    let result = postlog_client::import::import_maildir(&conn, &src, progress).await;
    bar.finish();
    copier.abort();
    conn.close();
    let r = result?;
    for (path, why) in &r.skipped {
        eprintln!("skipped {}: {why}", path.display());
    }
    println!(
        "{} found, {} stored, {} already there, {} skipped, {:.1} MB, {:.2} s",
        r.found,
        r.stored,
        r.already,
        r.skipped.len(),
        r.bytes as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

/// The IMAP password: the first line of --password-file, else $POSTLOG_IMAP_PASSWORD.
fn imap_password(file: Option<&std::path::Path>) -> anyhow::Result<String> {
    if let Some(f) = file {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("reading the password file {}", f.display()))?;
        let line = text.lines().next().unwrap_or("");
        anyhow::ensure!(
            !line.is_empty(),
            "the password file {} is empty",
            f.display()
        );
        return Ok(line.to_string());
    }
    match std::env::var("POSTLOG_IMAP_PASSWORD") {
        Ok(p) if !p.is_empty() => Ok(p),
        _ => anyhow::bail!(
            "no IMAP password: give --password-file FILE or set POSTLOG_IMAP_PASSWORD"
        ),
    }
}

pub async fn import_imap(a: ImportImapArgs) -> anyhow::Result<ExitCode> {
    use postlog_client::imap::{ImapOptions, ImapProgress, ImapSource, TlsMode};
    let profile = load(&a.profile)?;
    let tls = match a.tls {
        TlsArg::Implicit => TlsMode::Implicit,
        TlsArg::Starttls => TlsMode::StartTls,
        TlsArg::Plain => {
            anyhow::ensure!(
                a.insecure_plaintext,
                "--tls plain sends the password unencrypted; add --insecure-plaintext if \
                 that is what you want (an IMAP server on loopback)"
            );
            TlsMode::Plain
        }
    };
    let mut folder_tags = std::collections::HashMap::new();
    for ft in &a.folder_tags {
        let (folder, tag) = ft
            .rsplit_once('=')
            .with_context(|| format!("--folder-tag {ft:?}: expected FOLDER=TAG"))?;
        anyhow::ensure!(
            postlog_proto::message::valid_tag(tag),
            "--folder-tag {ft:?}: invalid tag {tag:?}"
        );
        folder_tags.insert(folder.to_string(), tag.to_string());
    }
    let src = ImapSource {
        port: a.port.unwrap_or(tls.default_port()),
        host: a.host,
        user: a.user,
        password: imap_password(a.password_file.as_deref())?,
        tls,
        ca_file: a.ca_file,
    };
    let opts = ImapOptions {
        folders: a.folders,
        folder_tags,
    };
    let endpoint = Endpoint::new(&profile.login.fingerprint)?;
    let conn = endpoint.connect(&profile.login).await?;
    let started = std::time::Instant::now();
    let progress = Arc::new(ImapProgress::default());
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (p1, p2, d2) = (progress.clone(), progress.clone(), done.clone());
    let copier = tokio::spawn(async move {
        loop {
            d2.store(p2.done.load(Ordering::Relaxed), Ordering::Relaxed);
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    });
    let bar = Bar::start(
        a.quiet,
        "messages",
        move || p1.total.load(Ordering::Relaxed),
        done,
        || 0,
    );
    let result =
        postlog_client::imap::import_imap(&conn, &profile.dir, &src, &opts, progress).await;
    bar.finish();
    copier.abort();
    conn.close();
    let r = result?;
    for (folder, uid, why) in &r.skipped {
        eprintln!("skipped {folder} UID {uid}: {why}");
    }
    if a.quiet {
        return Ok(ExitCode::SUCCESS);
    }
    for f in r.folders.iter().filter(|f| f.rescanned) {
        eprintln!(
            "{}: UIDVALIDITY changed, read again from the start",
            f.folder
        );
    }
    println!(
        "{} new in {} folders, {} stored, {} already there ({} tagged), {} skipped, {:.1} MB, {:.2} s",
        r.found,
        r.folders.len(),
        r.stored,
        r.already,
        r.tagged,
        r.skipped.len(),
        r.bytes as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

pub async fn status(p: ProfileArg) -> anyhow::Result<ExitCode> {
    let profile = load(&p)?;
    let cursor = profile.cursor()?;
    let local = Maildir::open(&profile.maildir)?.count()?;
    println!("profile:  {}", profile.dir.display());
    println!("server:   {}", profile.login.server);
    println!(
        "account:  {} (device {})",
        profile.login.account, profile.login.device
    );
    println!("maildir:  {} ({local} messages)", profile.maildir.display());
    println!("cursor:   {cursor}");
    let endpoint = Endpoint::new(&profile.login.fingerprint)?;
    match endpoint.connect(&profile.login).await {
        Ok(conn) => {
            let head = conn.head_at_auth;
            conn.close();
            println!(
                "head:     {head} ({} records behind)",
                head.saturating_sub(cursor)
            );
        }
        Err(e) => println!("head:     unknown ({e})"),
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn tag(a: TagArgs) -> anyhow::Result<ExitCode> {
    use postlog_client::state::State;
    use postlog_proto::BlobHash;
    let profile = load(&a.profile)?;
    let (mut add, mut remove, mut hashes) = (Vec::new(), Vec::new(), Vec::new());
    for arg in &a.args {
        if let Some(t) = arg.strip_prefix('+') {
            add.push(t.to_string());
        } else if let Some(t) = arg.strip_prefix('-') {
            remove.push(t.to_string());
        } else {
            let h: BlobHash = arg.parse().with_context(|| format!("{arg:?}"))?;
            hashes.push(h);
        }
    }
    if hashes.is_empty() {
        anyhow::bail!("name at least one message hash");
    }
    for t in add.iter().chain(&remove) {
        anyhow::ensure!(postlog_proto::message::valid_tag(t), "invalid tag {t:?}");
    }
    let mut state = State::open(&profile.dir)?;
    for h in &hashes {
        anyhow::ensure!(
            State::name_of(state.conn(), h)?.is_some(),
            "message {h} is not in this replica (sync first?)"
        );
    }
    if add.is_empty() && remove.is_empty() {
        for h in &hashes {
            let tags = State::tags_of(state.conn(), h)?.tags();
            if hashes.len() == 1 {
                for t in tags {
                    println!("{t}");
                }
            } else {
                println!("{h}\t{}", tags.join(" "));
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let seen = profile.cursor()?.saturating_sub(1);
    {
        let tx = state.conn().transaction()?;
        for h in &hashes {
            State::queue_op(&tx, h, &add, &remove, seen)?;
        }
        tx.commit()?;
    }
    drop(state);
    let endpoint = Endpoint::new(&profile.login.fingerprint)?;
    match sync::sync_once(&profile, &endpoint, Arc::new(Progress::default())).await {
        Ok(_) => Ok(ExitCode::SUCCESS),
        Err(e) if e.is_retryable() => {
            eprintln!(
                "queued; the server is not reachable ({e}), so the change is sent at the next sync"
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Err(e.into()),
    }
}
