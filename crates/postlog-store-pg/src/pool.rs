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

type Job = Box<dyn FnOnce(R<&mut Client>) + Send>;

pub(crate) struct Pool {
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
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

/// The connection string without its password, for messages.
pub(crate) fn redact(url: &str) -> String {
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
        })
    }

    /// Runs `f` on a pooled connection and waits for its result.
    pub(crate) fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Client) -> R<T> + Send + 'static,
    ) -> R<T> {
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |c| {
            let _ = tx.send(c.and_then(f));
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
        match client.as_mut() {
            Some(c) => job(Ok(c)),
            None => job(Err(Error::Other("no PostgreSQL connection".into()))),
        }
    }
}
