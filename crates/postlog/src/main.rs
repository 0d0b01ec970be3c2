//! `postlog`: the server, the client and the tools, as one binary.
//!
//! Flags are parsed by clap in [`cli`]; each subcommand lives in its own module and turns its
//! flags into ready objects before doing anything. `anyhow` lives only here.

mod cli;
mod client_cmds;
mod deliver;
mod demo;
mod progress;
mod sendmail;
mod server_cmds;

use clap::Parser;

fn main() -> std::process::ExitCode {
    // Installed as (or linked to) `sendmail`: behave as sendmail(8), flags and all.
    let argv: Vec<String> = std::env::args().collect();
    let as_sendmail = argv
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .is_some_and(|n| n == "sendmail");
    let args = if as_sendmail {
        None
    } else {
        Some(cli::Cli::parse())
    };
    let default_level = match args.as_ref().map(|a| &a.command) {
        Some(cli::Command::Serve(_)) => "info",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    // The server (and the demo, which runs one in-process) spreads connections over every
    // core. A client command has one connection: a single network thread (plus blocking
    // threads for files and the local database) spends less on waking and moving tasks
    // between workers.
    let serving = matches!(
        args.as_ref().map(|a| &a.command),
        Some(cli::Command::Serve(_) | cli::Command::Demo(_))
    );
    let mut builder = match serving {
        true => tokio::runtime::Builder::new_multi_thread(),
        false => tokio::runtime::Builder::new_current_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("postlog: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let Some(args) = args else {
        return run_to_end(&runtime, sendmail::run(argv[1..].to_vec()));
    };
    if let cli::Command::Sendmail(a) = args.command {
        return run_to_end(&runtime, sendmail::run(a.args));
    }
    match run_to_end(&runtime, cli::run(args)) {
        Ok(code) => code,
        Err(e) => {
            if is_broken_pipe(&e) {
                return std::process::ExitCode::SUCCESS;
            }
            eprintln!("postlog: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs a command to its end. Its connections close when their last handle is dropped, but
/// the frame telling the server so is sent by each connection's driver task: the drivers
/// get a turn before the process exits, or the server keeps the connection (and a Log
/// stream's slot) until its idle timeout, 60 s later.
fn run_to_end<T>(runtime: &tokio::runtime::Runtime, command: impl Future<Output = T>) -> T {
    runtime.block_on(async {
        let out = command.await;
        for _ in 0..2 {
            tokio::task::yield_now().await;
        }
        out
    })
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
