//! Progress bars: shown only on a terminal, and only for work that takes a while.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// A bar fed from atomic counters by a background ticker; hidden when stderr is not a
/// terminal or `quiet` is set, and drawn only after the work has run for half a second.
pub struct Bar {
    bar: ProgressBar,
    ticker: tokio::task::JoinHandle<()>,
}

impl Bar {
    pub fn start(
        quiet: bool,
        unit: &'static str,
        total: impl Fn() -> u64 + Send + 'static,
        done: Arc<AtomicU64>,
        base: impl Fn() -> u64 + Send + 'static,
    ) -> Bar {
        let show = !quiet && std::io::stderr().is_terminal();
        let bar = if show {
            ProgressBar::new(0)
        } else {
            ProgressBar::hidden()
        };
        let style = ProgressStyle::with_template(&format!(
            "{{elapsed_precise}} [{{wide_bar}}] {{pos}}/{{len}} {unit} ({{per_sec}}, eta {{eta}})"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        let b = bar.clone();
        let ticker = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            loop {
                let base = base();
                b.set_length(total().saturating_sub(base));
                b.set_position(done.load(Ordering::Relaxed).saturating_sub(base));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Bar { bar, ticker }
    }

    pub fn finish(self) {
        self.ticker.abort();
        self.bar.finish_and_clear();
    }
}
