//! When to try a chat completion again, and how long to wait first.
//!
//! Contract: a failed attempt is classified once ([`AttemptError`]); whether it is retried
//! depends only on that class, the attempts made so far and the options, and the wait
//! depends only on the backoff settings, the request's seed, the retry's number and the
//! server's `Retry-After`. So a rerun against the same faults waits the same times.

use std::time::Duration;

/// How long to wait between attempts: exponential from `initial`, doubled per retry up to
/// `max`, with a deterministic jitter; a `Retry-After` on a 429 or 503 is honoured up to
/// `retry_after_cap`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The wait before the first retry (before jitter).
    pub initial: Duration,
    /// No wait computed from the exponential exceeds this.
    pub max: Duration,
    /// A server's `Retry-After` is obeyed up to this; longer asks are cut to it.
    pub retry_after_cap: Duration,
    /// Scale each exponential wait by a factor in [0.5, 1), drawn from the request's seed
    /// and the retry's number, so requests that failed together do not all come back
    /// together. Deterministic: the same request waits the same on every run.
    pub jitter: bool,
}

/// Half a second: long enough for a restarting server's socket to come back, short
/// enough that a transient error costs little.
pub const DEFAULT_BACKOFF_INITIAL: Duration = Duration::from_millis(500);
/// Half a minute: with the default five retries the doubling reaches 8 s, so the cap only
/// matters for longer retry budgets.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A minute: hosted APIs ask for waits of seconds to a minute under rate limits; a longer
/// ask is more likely a misconfigured proxy than a plan worth stalling a stage for.
pub const DEFAULT_RETRY_AFTER_CAP: Duration = Duration::from_secs(60);

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: DEFAULT_BACKOFF_INITIAL,
            max: DEFAULT_BACKOFF_MAX,
            retry_after_cap: DEFAULT_RETRY_AFTER_CAP,
            jitter: true,
        }
    }
}

impl Backoff {
    /// The wait before retry number `retry` (1 for the first retry) of the request with
    /// `seed`. A server's `Retry-After` replaces the exponential wait, cut to
    /// `retry_after_cap`.
    pub fn delay(&self, seed: u64, retry: u32, retry_after: Option<Duration>) -> Duration {
        if let Some(asked) = retry_after {
            return asked.min(self.retry_after_cap);
        }
        let doublings = retry.saturating_sub(1).min(31);
        let exponential = self
            .initial
            .checked_mul(1u32 << doublings)
            .unwrap_or(self.max)
            .min(self.max);
        if !self.jitter {
            return exponential;
        }
        // 53 random bits as a fraction in [0, 1), exactly representable in an f64.
        let unit = (mix(seed ^ u64::from(retry).wrapping_mul(JITTER_STREAM)) >> 11) as f64
            / (1u64 << 53) as f64;
        exponential.mul_f64(0.5 + 0.5 * unit)
    }
}

/// Separates the jitter streams of consecutive retries of one seed (an odd constant, the
/// golden ratio in 64 bits, as splitmix64 uses).
const JITTER_STREAM: u64 = 0x9E37_79B9_7F4A_7C15;

/// splitmix64's finaliser: a bijective mix of 64 bits.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(JITTER_STREAM);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A `Retry-After` value in delta-seconds (`120`). The HTTP-date form is not read (the
/// exponential backoff applies instead): chat servers send seconds.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// At most this many malformed responses (not JSON, no `choices[0].message.content`) are
/// taken for one request: the first may be a proxy's or a load balancer's garbage and is
/// retried once; a second says the server does not speak the API, and retrying more
/// would only repeat it.
pub const MALFORMED_ATTEMPTS: u32 = 2;

/// Why one attempt at a chat completion failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptError {
    /// The request did not finish within the per-request timeout.
    Timeout(String),
    /// The connection could not be made or broke (refused, reset, closed without a
    /// response, DNS, a broken HTTP exchange).
    Connection(String),
    /// The server answered with a status other than 2xx.
    Status {
        status: u16,
        /// The start of the response body, key redacted.
        excerpt: String,
        /// The server's `Retry-After`, when it sent one in seconds.
        retry_after: Option<Duration>,
    },
    /// A 2xx response that is not a chat completion.
    Malformed {
        /// What is missing or wrong.
        what: String,
        /// The start of the response body, key redacted.
        excerpt: String,
    },
    /// A failure no retry can mend (a TLS certificate, a bad URL, an oversized body).
    Permanent(String),
}

impl AttemptError {
    /// Whether another attempt may succeed: timeouts, connection failures, 408, 429, 5xx
    /// and malformed responses (the latter limited by [`MALFORMED_ATTEMPTS`]). Other
    /// 4xx say the request itself is wrong (bad model name, bad key) and are not retried.
    pub fn is_transient(&self) -> bool {
        match self {
            AttemptError::Timeout(_) | AttemptError::Connection(_) => true,
            AttemptError::Status { status, .. } => {
                *status == 408 || *status == 429 || (500..600).contains(status)
            }
            AttemptError::Malformed { .. } => true,
            AttemptError::Permanent(_) => false,
        }
    }

    /// The wait the server asked for, honoured on 429 and 503.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            AttemptError::Status {
                status: 429 | 503,
                retry_after,
                ..
            } => *retry_after,
            _ => None,
        }
    }

    /// Classifies a transport error of ureq.
    pub fn from_transport(error: ureq::Error) -> Self {
        match error {
            ureq::Error::Timeout(which) => AttemptError::Timeout(format!("timed out ({which})")),
            ureq::Error::Io(io)
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
                ) =>
            {
                AttemptError::Timeout(format!("timed out: {io}"))
            }
            ureq::Error::Io(io) => AttemptError::Connection(format!("connection: {io}")),
            error @ (ureq::Error::ConnectionFailed
            | ureq::Error::HostNotFound
            | ureq::Error::Protocol(_)) => AttemptError::Connection(format!("connection: {error}")),
            other => AttemptError::Permanent(other.to_string()),
        }
    }
}

impl std::fmt::Display for AttemptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttemptError::Timeout(what)
            | AttemptError::Connection(what)
            | AttemptError::Permanent(what) => write!(f, "{what}"),
            AttemptError::Status {
                status, excerpt, ..
            } => write!(f, "HTTP status {status}, body {excerpt:?}"),
            AttemptError::Malformed { what, excerpt } => {
                write!(f, "malformed response ({what}), body {excerpt:?}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(initial_ms: u64, max_ms: u64) -> Backoff {
        Backoff {
            initial: Duration::from_millis(initial_ms),
            max: Duration::from_millis(max_ms),
            retry_after_cap: Duration::from_millis(5_000),
            jitter: false,
        }
    }

    #[test]
    fn doubles_per_retry_up_to_the_cap() {
        let b = plain(100, 1_000);
        let waits: Vec<u128> = (1..=6).map(|r| b.delay(7, r, None).as_millis()).collect();
        assert_eq!(waits, vec![100, 200, 400, 800, 1_000, 1_000]);
        // A retry count far past the doubling range does not overflow.
        assert_eq!(b.delay(7, u32::MAX, None).as_millis(), 1_000);
    }

    #[test]
    fn jitter_is_in_the_upper_half_and_deterministic() {
        let b = Backoff {
            jitter: true,
            ..plain(1_000, 60_000)
        };
        for seed in 0..50u64 {
            for retry in 1..=4 {
                let full = Duration::from_millis(1_000 << (retry - 1));
                let d = b.delay(seed, retry, None);
                assert!(
                    d >= full / 2 && d < full,
                    "seed {seed} retry {retry}: {d:?}"
                );
                assert_eq!(d, b.delay(seed, retry, None));
            }
        }
        // Different seeds spread out: not all 50 first retries wait the same.
        let distinct: std::collections::BTreeSet<Duration> =
            (0..50u64).map(|s| b.delay(s, 1, None)).collect();
        assert!(distinct.len() > 40, "{}", distinct.len());
    }

    #[test]
    fn retry_after_replaces_the_backoff_up_to_its_cap() {
        let b = plain(100, 1_000);
        assert_eq!(
            b.delay(1, 1, Some(Duration::from_secs(2))),
            Duration::from_secs(2)
        );
        assert_eq!(
            b.delay(1, 1, Some(Duration::from_secs(90))),
            Duration::from_secs(5)
        );
        assert_eq!(parse_retry_after(" 12 "), Some(Duration::from_secs(12)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }

    #[test]
    fn only_transient_failures_are_retried() {
        let status = |status| AttemptError::Status {
            status,
            excerpt: String::new(),
            retry_after: Some(Duration::from_secs(3)),
        };
        for code in [408, 429, 500, 502, 503, 504] {
            assert!(status(code).is_transient(), "{code}");
        }
        for code in [400, 401, 403, 404, 422] {
            assert!(!status(code).is_transient(), "{code}");
        }
        assert_eq!(status(429).retry_after(), Some(Duration::from_secs(3)));
        assert_eq!(status(503).retry_after(), Some(Duration::from_secs(3)));
        assert_eq!(status(500).retry_after(), None);
        assert!(!AttemptError::Permanent("tls".into()).is_transient());
    }
}
