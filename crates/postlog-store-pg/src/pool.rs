//! PostgreSQL connections on threads of their own.
//!
//! The synchronous `postgres` client drives a small tokio runtime of its own on the calling
//! thread, which must not be a thread of another runtime. So every query runs on one of the
//! pool's threads; callers (async tasks' blocking threads, the server's handlers) hand over
//! a closure and wait for its result. A connection that broke is opened again for the next
//! job.

use std::sync::{Arc, Mutex, mpsc};

use postgres::{Client, NoTls};

use crate::{Error, R};

/// A job; returns whether it failed (then the worker checks its connection).
type Job = Box<dyn FnOnce(R<&mut Client>) -> bool + Send>;

pub(crate) struct Pool {
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    size: usize,
}

/// Opens a connection, with a clear error.
pub(crate) fn connect(url: &str) -> R<Client> {
    Client::connect(url, NoTls).map_err(|e| {
        Error::Other(format!(
            "cannot connect to PostgreSQL ({}): {e}",
            redact(url)
        ))
    })
}

/// The connection string without its password, for messages: `password=…` in key=value
/// form, `user:…@` in a `postgres://` URL.
pub(crate) fn redact(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        return match rest.split_once('@') {
            Some((userinfo, host)) => {
                let user = userinfo.split(':').next().unwrap_or("");
                format!("{scheme}://{user}:…@{host}")
            }
            None => url.to_owned(),
        };
    }
    url.split_whitespace()
        .map(|kv| {
            if kv.starts_with("password=") {
                "password=…"
            } else {
                kv
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

impl Pool {
    pub(crate) fn new(url: &str, size: usize) -> R<Pool> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..size.max(1) {
            let rx = rx.clone();
            let url = url.to_owned();
            std::thread::Builder::new()
                .name(format!("postlog-pg-{i}"))
                .spawn(move || worker(&url, &rx))
                .map_err(|e| Error::Other(format!("cannot start a thread: {e}")))?;
        }
        Ok(Pool {
            jobs: Mutex::new(Some(tx)),
            size: size.max(1),
        })
    }

    /// Runs `f` on a pooled connection and waits for its result. When the connection turns
    /// out to be gone (PostgreSQL restarted, failed over, or ended it), `f` runs again on a
    /// fresh one, as often as the pool has connections that may be stale.
    pub(crate) fn run<T: Send + 'static>(
        &self,
        f: impl Fn(&mut Client) -> R<T> + Send + Sync + 'static,
    ) -> R<T> {
        let f = Arc::new(f);
        let mut tries = 0;
        loop {
            let g = f.clone();
            match self.run_once(move |c| g(c)) {
                Err(Error::Pg(e)) if connection_lost(&e) && tries <= self.size => {
                    tracing::debug!(error = %e, "PostgreSQL connection lost; retrying on a new one");
                    tries += 1;
                }
                r => return r,
            }
        }
    }

    /// Runs `f` once on a pooled connection and waits for its result.
    pub(crate) fn run_once<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Client) -> R<T> + Send + 'static,
    ) -> R<T> {
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |c| {
            let r = c.and_then(f);
            let failed = r.is_err();
            let _ = tx.send(r);
            failed
        });
        let sent = match self.jobs.lock() {
            Ok(j) => j.as_ref().is_some_and(|j| j.send(job).is_ok()),
            Err(_) => false,
        };
        if !sent {
            return Err(Error::Other("the PostgreSQL pool is shut down".into()));
        }
        rx.recv()
            .unwrap_or_else(|_| Err(Error::Other("a PostgreSQL worker ended".into())))
    }
}

/// Whether an error means the connection is gone (and a retry on another one is right):
/// closed, or SQLSTATE class 08 (connection exception) or 57P (operator intervention:
/// shutdown, terminated).
pub(crate) fn connection_lost(e: &postgres::Error) -> bool {
    e.is_closed()
        || e.code()
            .is_some_and(|c| c.code().starts_with("08") || c.code().starts_with("57P"))
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Closing the channel ends the workers, each dropping its connection on its own
        // thread.
        if let Ok(mut j) = self.jobs.lock() {
            j.take();
        }
    }
}

fn worker(url: &str, rx: &Mutex<mpsc::Receiver<Job>>) {
    let mut client: Option<Client> = None;
    loop {
        let job = match rx.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else { return };
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = None;
            match connect(url) {
                Ok(c) => client = Some(c),
                Err(e) => {
                    job(Err(e));
                    continue;
                }
            }
        }
        let failed = match client.as_mut() {
            Some(c) => job(Ok(c)),
            None => job(Err(Error::Other("no PostgreSQL connection".into()))),
        };
        // After a failure, make sure the connection still works (one empty query), so the
        // next job does not meet a connection PostgreSQL has ended.
        if failed
            && client.as_mut().is_some_and(|c| {
                c.is_closed() || c.is_valid(std::time::Duration::from_secs(2)).is_err()
            })
        {
            client = None;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redact_hides_passwords_in_both_forms() {
        assert_eq!(
            super::redact("host=db user=p password=s3cret dbname=x"),
            "host=db user=p password=… dbname=x"
        );
        assert_eq!(
            super::redact("postgresql://p:s3cret@db:5432/x"),
            "postgresql://p:…@db:5432/x"
        );
        assert_eq!(super::redact("postgresql://db/x"), "postgresql://db/x");
    }
}
