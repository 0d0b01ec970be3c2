//! `netsim udp|tcp UPSTREAM RTT_MS`: runs a postlog-netsim proxy in front of UPSTREAM that
//! adds RTT_MS of round-trip time (half each way), prints the address to connect to on the
//! first line of stdout, and forwards until killed. Used by bench/sync-vs-mbsync.sh to put
//! Postlog (UDP) and mbsync/Dovecot (TCP) behind the same delay.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [kind, upstream, rtt] = args.as_slice() else {
        bail!("usage: netsim udp|tcp UPSTREAM RTT_MS");
    };
    let upstream: SocketAddr = upstream.parse().context("UPSTREAM must be ADDRESS:PORT")?;
    let rtt = Duration::from_millis(rtt.parse().context("RTT_MS must be a number")?);
    // The proxy runs while its handle lives: until the process is stopped.
    let (addr, _udp, _tcp) = match kind.as_str() {
        "udp" => {
            let p = postlog_netsim::UdpProxy::start(upstream, postlog_netsim::Impairment::rtt(rtt))
                .await?;
            (p.local_addr(), Some(p), None)
        }
        "tcp" => {
            let p = postlog_netsim::TcpProxy::start(upstream, rtt / 2).await?;
            (p.local_addr(), None, Some(p))
        }
        other => bail!("unknown proxy kind {other:?}: udp or tcp"),
    };
    let mut out = std::io::stdout();
    writeln!(out, "{addr}")?;
    out.flush()?;
    tokio::signal::ctrl_c().await?;
    Ok(())
}
