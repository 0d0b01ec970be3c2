//! serve, account, device, verify.

use std::process::ExitCode;

use anyhow::Context;
use postlog_server::{Server, ServerConfig, StartOptions};
use postlog_store::Accounts;

use crate::cli::{AccountAddArgs, DataArg, DeviceCmd, ServeArgs};

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
    let mut accounts =
        Accounts::open(data).with_context(|| format!("opening {}", data.display()))?;
    let creds = accounts.add_device(&a.name, &a.addresses, &a.device)?;
    let url = login_url(data, &creds, a.server)?;
    eprintln!("account {}: device {} added", creds.account, creds.device);
    println!("{url}");
    Ok(ExitCode::SUCCESS)
}

pub fn device(d: DeviceCmd) -> anyhow::Result<ExitCode> {
    match d {
        DeviceCmd::List { account, data } => {
            let accounts = Accounts::open(&data.data)?;
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
            let accounts = Accounts::open(&data.data)?;
            if !accounts.revoke_device(&account, device)? {
                anyhow::bail!("account {account} has no device {device}");
            }
            eprintln!("device {device} revoked");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn verify(a: DataArg) -> anyhow::Result<ExitCode> {
    let report = postlog_store::verify(&a.data)
        .with_context(|| format!("verifying {}", a.data.display()))?;
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
