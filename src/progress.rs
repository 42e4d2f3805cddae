//! Progress of long stages: items done, rate and ETA. On a terminal a live bar; elsewhere
//! (CI logs, pipes) one line every [`LOG_INTERVAL`], so a log shows the job is alive.

use std::io::IsTerminal;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

/// How often a progress line is printed when stderr is not a terminal.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// A progress report for one stage.
pub struct Progress {
    label: String,
    total: Option<u64>,
    bar: Option<ProgressBar>,
    /// The unit of the secondary count (`tokens`), when the stage keeps one.
    secondary_unit: Option<String>,
    log: Mutex<LogState>,
    start: Instant,
}

struct LogState {
    done: u64,
    /// A second count shown as a rate (tokens next to passages), when one is kept.
    secondary: u64,
    last_print: Instant,
}

impl Progress {
    /// Starts reporting `label` with `total` items when known. `quiet` shows nothing.
    pub fn new(label: &str, total: Option<u64>, quiet: bool) -> Self {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = match total {
                Some(n) => ProgressBar::new(n),
                None => ProgressBar::new_spinner(),
            };
            let template = if total.is_some() {
                "{prefix:>20} [{bar:30}] {pos}/{len} {per_sec} {msg} ETA {eta}"
            } else {
                "{prefix:>20} {pos} {per_sec} {msg}"
            };
            if let Ok(style) = ProgressStyle::with_template(template) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_prefix(label.to_string());
            // Stages that run at the same time (generation beside the passage index)
            // each keep their own line.
            static BARS: OnceLock<MultiProgress> = OnceLock::new();
            BARS.get_or_init(MultiProgress::new).add(bar)
        });
        let now = Instant::now();
        Self {
            label: label.to_string(),
            total,
            bar,
            secondary_unit: None,
            log: Mutex::new(LogState {
                done: 0,
                secondary: 0,
                last_print: if quiet {
                    now + Duration::from_secs(u64::MAX / 4)
                } else {
                    now
                },
            }),
            start: now,
        }
    }

    /// Also shows the rate of a second count, in `unit`s per second (tokens generated
    /// next to passages done).
    pub fn with_secondary(mut self, unit: &str) -> Self {
        self.secondary_unit = Some(unit.to_string());
        self
    }

    /// Records `n` more items done.
    pub fn inc(&self, n: u64) {
        self.inc_with(n, 0);
    }

    /// Records `n` more items done and `secondary` more of the second count.
    pub fn inc_with(&self, n: u64, secondary: u64) {
        let Ok(mut log) = self.log.lock() else { return };
        log.done += n;
        log.secondary += secondary;
        if let Some(bar) = &self.bar {
            bar.inc(n);
            if let Some(rate) = self.secondary_rate(log.secondary) {
                bar.set_message(rate);
            }
        }
        if self.bar.is_none() && log.last_print.elapsed() >= LOG_INTERVAL {
            log.last_print = Instant::now();
            eprintln!("{}", self.line(log.done, log.secondary));
        }
    }
}

/// Below this many items a second, a rate reads better as seconds per item (a training
/// step of 25 s would otherwise show as "0.0/s").
const SLOW_RATE: f64 = 0.1;

/// `12.3/s`, or `25.0 s each` when slower than [`SLOW_RATE`].
fn rate_text(rate: f64) -> String {
    if rate > 0.0 && rate < SLOW_RATE {
        format!("{:.1} s each", 1.0 / rate)
    } else {
        format!("{rate:.1}/s")
    }
}

impl Progress {
    fn secondary_rate(&self, count: u64) -> Option<String> {
        let unit = self.secondary_unit.as_ref()?;
        let secs = self.start.elapsed().as_secs_f64().max(1e-9);
        Some(format!("{:.1} {unit}/s", count as f64 / secs))
    }

    fn line(&self, done: u64, secondary: u64) -> String {
        let secs = self.start.elapsed().as_secs_f64().max(1e-9);
        let rate = done as f64 / secs;
        let line = self.rate_line(done, rate);
        match self.secondary_rate(secondary) {
            Some(extra) => format!("{line}, {extra}"),
            None => line,
        }
    }

    fn rate_line(&self, done: u64, rate: f64) -> String {
        match self.total {
            Some(total) if rate > 0.0 => format!(
                "{}: {done}/{total} ({}, ETA {:.0}s)",
                self.label,
                rate_text(rate),
                total.saturating_sub(done) as f64 / rate
            ),
            _ => format!("{}: {done} ({})", self.label, rate_text(rate)),
        }
    }

    /// Ends the report, printing a final line with the overall rate.
    pub fn finish(&self) -> (u64, Duration) {
        let done = self.log.lock().map(|l| l.done).unwrap_or(0);
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        (done, self.start.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::rate_text;

    #[test]
    fn slow_rates_read_as_seconds_each() {
        assert_eq!(rate_text(12.34), "12.3/s");
        assert_eq!(rate_text(0.1), "0.1/s");
        // One step every 25 s: 0.04/s would print as 0.0/s.
        assert_eq!(rate_text(0.04), "25.0 s each");
        assert_eq!(rate_text(0.0), "0.0/s");
    }
}
