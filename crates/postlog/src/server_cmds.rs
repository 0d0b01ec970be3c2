//! serve, account, device, verify.

use std::process::ExitCode;

use anyhow::Context;
use postlog_server::storage::Admin;
use postlog_server::{Server, ServerConfig, StartOptions};

use crate::cli::{AccountAddArgs, DataArg, DeviceCmd, GcArgs, MigrateArgs, ServeArgs};

pub async fn serve(a: ServeArgs) -> anyhow::Result<ExitCode> {
    let opts = StartOptions {
        listen: a.listen,
        lmtp: a.lmtp,
        lmtp_unix: a.lmtp_socket,
        smtp: a.smtp,
        relay: a.relay,
    };
    let server = Server::start_with(&a.data.data, opts)
        .with_context(|| format!("starting the server in {}", a.data.data.display()))?;
    let addr = server.local_addr()?;
    tracing::info!(%addr, fingerprint = server.fingerprint(), data = %a.data.data.display(), "postlog server listening");
    if let Some(a) = server.lmtp_addr() {
        tracing::info!(addr = %a, "LMTP listening");
    }
    if let Some(p) = server.lmtp_socket() {
        tracing::info!(socket = %p.display(), "LMTP listening");
    }
    if let Some(a) = server.smtp_addr() {
        tracing::info!(addr = %a, "SMTP listening");
    }
    server.run(shutdown_signal()).await;
    tracing::info!("server stopped");
    Ok(ExitCode::SUCCESS)
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut i), Ok(mut t)) => {
            tokio::select! {
                _ = i.recv() => {}
                _ = t.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// The login URL for a device: the server address from the config, unless given.
pub fn login_url(
    data: &std::path::Path,
    creds: &postlog_store::DeviceCredentials,
    server: Option<String>,
) -> anyhow::Result<postlog_client::LoginUrl> {
    let cfg = ServerConfig::load_or_init(data)?;
    let identity = postlog_server::tls::load_or_generate(data, &cfg)?;
    let server = server.unwrap_or_else(|| format!("{}:{}", cfg.public_host, cfg.listen.port()));
    Ok(postlog_client::LoginUrl {
        account: creds.account.clone(),
        server,
        device: creds.device,
        secret: creds.secret,
        fingerprint: identity.fingerprint(),
    })
}

pub fn account_add(a: AccountAddArgs) -> anyhow::Result<ExitCode> {
    let data = &a.data.data;
    // Make sure config and certificate exist, so the URL carries the right fingerprint.
    ServerConfig::load_or_init(data)?;
    let mut accounts = Admin::open(data).with_context(|| format!("opening {}", data.display()))?;
    let creds = accounts.add_device(&a.name, &a.addresses, &a.device)?;
    let url = login_url(data, &creds, a.server)?;
    eprintln!("account {}: device {} added", creds.account, creds.device);
    println!("{url}");
    Ok(ExitCode::SUCCESS)
}

pub fn device(d: DeviceCmd) -> anyhow::Result<ExitCode> {
    match d {
        DeviceCmd::List { account, data } => {
            let accounts = Admin::open(&data.data)?;
            for dev in accounts.list_devices(&account)? {
                println!(
                    "{}\t{}\t{}",
                    dev.device,
                    dev.name,
                    if dev.revoked { "revoked" } else { "active" }
                );
            }
        }
        DeviceCmd::Revoke {
            account,
            device,
            data,
        } => {
            let accounts = Admin::open(&data.data)?;
            if !accounts.revoke_device(&account, device)? {
                anyhow::bail!("account {account} has no device {device}");
            }
            eprintln!("device {device} revoked");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn verify(a: DataArg) -> anyhow::Result<ExitCode> {
    let (report, garbage) = postlog_server::storage::verify(&a.data)
        .with_context(|| format!("verifying {}", a.data.display()))?;
    if garbage > 0 {
        println!("{garbage} unreferenced objects (not a problem; `postlog gc` removes them)");
    }
    println!(
        "{} accounts, {} records ({} scrubbed), {} blobs, {} bytes",
        report.accounts, report.records, report.scrubbed, report.blobs, report.blob_bytes
    );
    for p in &report.problems {
        println!("PROBLEM: {p}");
    }
    if report.is_ok() {
        println!("ok");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("{} problems", report.problems.len());
        Ok(ExitCode::FAILURE)
    }
}

pub fn migrate(a: MigrateArgs) -> anyhow::Result<ExitCode> {
    let data = &a.data.data;
    let config = ServerConfig::load_or_init(data)?;
    let Some(settings) = config.storage.postgres().map_err(anyhow::Error::msg)? else {
        anyhow::bail!(
            "{}: [storage] backend is \"embedded\"; set backend = \"postgres\" with the \
             database and bucket to migrate into (docs/DEPLOYMENT.md)",
            data.join("postlog.toml").display()
        );
    };
    let target = postlog_store_pg::PgStore::open(&settings, data)
        .context("opening the PostgreSQL + S3 storage")?;
    use std::io::IsTerminal;
    let bar = if !a.quiet && std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(0).with_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{wide_bar}] {pos}/{len} blobs of {msg} (eta {eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        )
    } else {
        indicatif::ProgressBar::hidden()
    };
    let started = std::time::Instant::now();
    let report = target
        .migrate_from(&a.from, &|p| {
            bar.set_length(p.blobs_total);
            bar.set_position(p.blobs_done);
            bar.set_message(p.account.clone());
        })
        .with_context(|| format!("migrating {}", a.from.display()))?;
    bar.finish_and_clear();
    println!(
        "migrated {} accounts ({} already there), {} records, {} blobs ({} bytes), {} devices in {:.1} s",
        report.accounts,
        report.skipped,
        report.records,
        report.blobs,
        report.blob_bytes,
        report.devices,
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

pub fn gc(a: GcArgs) -> anyhow::Result<ExitCode> {
    let data = &a.data.data;
    let config = ServerConfig::load_or_init(data)?;
    let min_age = postlog_server::config::parse_duration(&a.min_age).map_err(anyhow::Error::msg)?;
    let Some(settings) = config.storage.postgres().map_err(anyhow::Error::msg)? else {
        println!("embedded storage: nothing to collect (deletions remove their files)");
        return Ok(ExitCode::SUCCESS);
    };
    let store = postlog_store_pg::PgStore::open(&settings, data)?;
    let removed = store.collect_garbage(min_age)?;
    println!("removed {removed} unreferenced objects");
    Ok(ExitCode::SUCCESS)
}
