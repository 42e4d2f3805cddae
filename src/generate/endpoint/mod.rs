//! The endpoint generator: queries from an OpenAI-compatible chat completions server
//! (vLLM, llama.cpp's server, Ollama, TGI, OpenAI itself).
//!
//! Contract:
//! - Every request gets exactly one outcome, in request order. A request is sent as
//!   `POST {base_url}/chat/completions` with the request's messages, the sampling
//!   settings and a seed derived from the request's seed ([`wire_seed`]), so a server
//!   that honours seeds gives the same query on a rerun.
//! - At most `concurrency` requests are in flight: a batch runs on that many threads,
//!   each taking the next request when its last one has its outcome.
//! - Timeouts, connection failures (refused, reset, closed without an answer), 408, 429
//!   and 5xx are retried up to `max_retries` times, waiting as [`Backoff`] says (a
//!   429's or 503's `Retry-After` is obeyed up to its cap). Other 4xx are not retried:
//!   the request itself is wrong. A 2xx that is not a chat completion (not JSON, no
//!   `choices[0].message.content`) is retried once ([`MALFORMED_ATTEMPTS`]), since a
//!   proxy may have mangled it, then recorded.
//! - A request that still fails is a [`Generated::Failed`] whose reason names the
//!   passage id, the query type, the last error (status and the start of the body, or
//!   the transport error) and the number of attempts. The batch goes on.
//! - The API key is read from the environment variable named by `api_key_env`, once, at
//!   construction, and sent as `Authorization: Bearer <key>`. It is never logged, never
//!   in `Debug` output, never in an error or a reason (a body that echoes it is
//!   redacted), and not in [`QueryGenerator::id`].
//! - `min_new_tokens` has no field in the chat completions API and is not sent.
//! - Proxies are taken from the environment as ureq does (`HTTPS_PROXY`, `HTTP_PROXY`,
//!   `ALL_PROXY`, `NO_PROXY`).

mod retry;
mod wire;

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use distillery_operators::llm::SamplingParams;

pub use retry::{
    Backoff, DEFAULT_BACKOFF_INITIAL, DEFAULT_BACKOFF_MAX, DEFAULT_RETRY_AFTER_CAP,
    MALFORMED_ATTEMPTS,
};
pub use wire::{wire_seed, BODY_EXCERPT_CHARS, WIRE_SEED_BITS};

use super::{Generated, GenerationRequest, QueryGenerator};
use crate::error::EngineError;
use retry::{parse_retry_after, AttemptError};
use wire::{excerpt, parse_completion, ChatRequest, Completion};

/// Eight requests in flight: enough to keep a single-GPU vLLM or llama.cpp server
/// batching, few enough not to trip a hosted API's rate limit at once.
pub const DEFAULT_CONCURRENCY: usize = 8;
/// Most requests in flight, each on its own thread: past this, threads cost more than
/// any server gains.
pub const MAX_CONCURRENCY: usize = 1024;
/// A minute per request: 50 new tokens take well under a second on a served model; a
/// loaded server queueing the request may take tens of seconds.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Five retries: with the default backoff about 8 s of waiting in all (more where a
/// server asks with `Retry-After`), enough to ride out a server restart.
pub const DEFAULT_MAX_RETRIES: u32 = 5;
/// A chat completion of 50 tokens is a few kilobytes; a body past this many bytes is not
/// one, and is not read further.
pub const MAX_RESPONSE_BYTES: u64 = 4 << 20;

/// What the user says about an endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointOptions {
    /// The API root, `http://localhost:8000/v1` for vLLM; requests go to
    /// `{base_url}/chat/completions`. A trailing `/` is ignored.
    pub base_url: String,
    /// The model name the server knows (`model` in the request).
    pub model: String,
    /// The NAME of the environment variable holding the API key (`OPENAI_API_KEY`), or
    /// `None` for servers without one.
    pub api_key_env: Option<String>,
    /// Most requests in flight at once, 1 to [`MAX_CONCURRENCY`].
    pub concurrency: usize,
    /// Longest one attempt may take, from connecting to the last byte of the answer.
    pub timeout: Duration,
    /// Retries after the first attempt of a request (so `max_retries + 1` attempts at
    /// most).
    pub max_retries: u32,
    /// Waits between attempts.
    pub backoff: Backoff,
    /// Temperature, top-p and `max_new_tokens` (sent as `max_tokens`).
    pub sampling: SamplingParams,
    /// Strings that end generation, sent as `stop` when not empty.
    pub stop: Vec<String>,
}

impl EndpointOptions {
    /// The defaults for a server at `base_url` serving `model`, without a key.
    pub fn new(base_url: impl Into<String>, model: impl Into<String>) -> Self {
        EndpointOptions {
            base_url: base_url.into(),
            model: model.into(),
            api_key_env: None,
            concurrency: DEFAULT_CONCURRENCY,
            timeout: DEFAULT_TIMEOUT,
            max_retries: DEFAULT_MAX_RETRIES,
            backoff: Backoff::default(),
            sampling: SamplingParams::default(),
            stop: Vec::new(),
        }
    }
}

/// Options that cannot make an endpoint generator. None of them holds the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    /// `base_url` is not an `http://` or `https://` URL.
    #[error("endpoint base_url `{url}`: {reason}")]
    BadUrl { url: String, reason: String },
    /// An option is out of its range.
    #[error("endpoint option `{field}`: {reason}")]
    BadOption { field: &'static str, reason: String },
    /// `api_key_env` names a variable that is not set (or not Unicode).
    #[error("endpoint api_key_env: environment variable `{name}` is not set")]
    KeyNotSet { name: String },
    /// The key's variable is set but cannot be an HTTP header value.
    #[error(
        "endpoint api_key_env: environment variable `{name}` is {reason} (its value is not shown)"
    )]
    BadKey { name: String, reason: &'static str },
}

impl From<EndpointError> for EngineError {
    fn from(error: EndpointError) -> Self {
        EngineError::Invalid(error.to_string())
    }
}

/// An API key; its `Debug` does not show it.
struct ApiKey(String);

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// A [`QueryGenerator`] over an OpenAI-compatible chat completions server.
pub struct EndpointGenerator {
    options: EndpointOptions,
    /// `{base_url}/chat/completions`.
    url: String,
    key: Option<ApiKey>,
    agent: ureq::Agent,
}

impl fmt::Debug for EndpointGenerator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointGenerator")
            .field("url", &self.url)
            .field("options", &self.options)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl EndpointGenerator {
    /// Checks the options and reads the key from the environment.
    pub fn new(options: EndpointOptions) -> Result<Self, EndpointError> {
        let bad_url = |reason: &str| EndpointError::BadUrl {
            url: options.base_url.clone(),
            reason: reason.to_string(),
        };
        let trimmed = options.base_url.trim();
        let scheme = ["http://", "https://"]
            .into_iter()
            .find(|scheme| trimmed.starts_with(scheme))
            .ok_or_else(|| bad_url("must start with http:// or https://"))?;
        let rest = trimmed[scheme.len()..].trim_end_matches('/');
        if rest.is_empty() || rest.starts_with('/') {
            return Err(bad_url("has no host"));
        }
        if rest.chars().any(char::is_whitespace) {
            return Err(bad_url("contains whitespace"));
        }
        let base = format!("{scheme}{rest}");
        check_options(&options)?;
        let key = match &options.api_key_env {
            None => None,
            Some(name) => Some(read_key(name)?),
        };
        let config = ureq::Agent::config_builder()
            // 4xx and 5xx come back as responses, so their bodies can be read.
            .http_status_as_error(false)
            .timeout_global(Some(options.timeout))
            .max_idle_connections(options.concurrency)
            .max_idle_connections_per_host(options.concurrency)
            .user_agent(concat!("distillery/", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(EndpointGenerator {
            url: format!("{base}/chat/completions"),
            options,
            key,
            agent: config.new_agent(),
        })
    }

    /// The options this generator was made with.
    pub fn options(&self) -> &EndpointOptions {
        &self.options
    }

    /// One request, retried as the module docs say, to its outcome.
    fn generate_one(&self, request: &GenerationRequest) -> Generated {
        let body = ChatRequest::new(
            &self.options.model,
            &request.messages,
            &self.options.sampling,
            &self.options.stop,
            request.seed,
        );
        let body = match serde_json::to_vec(&body) {
            Ok(body) => body,
            Err(e) => return self.failed(request, &format!("cannot encode the request: {e}"), 0),
        };
        let mut attempts = 0u32;
        let mut malformed = 0u32;
        loop {
            attempts += 1;
            let error = match self.attempt(&body) {
                Ok(completion) => return self.finish(request, completion),
                Err(error) => error,
            };
            if matches!(error, AttemptError::Malformed { .. }) {
                malformed += 1;
            }
            let retry = error.is_transient()
                && attempts <= self.options.max_retries
                && malformed < MALFORMED_ATTEMPTS;
            if !retry {
                return self.failed(request, &error.to_string(), attempts);
            }
            std::thread::sleep(self.options.backoff.delay(
                request.seed,
                attempts,
                error.retry_after(),
            ));
        }
    }

    /// One HTTP exchange.
    fn attempt(&self, body: &[u8]) -> Result<Completion, AttemptError> {
        let mut call = self
            .agent
            .post(&self.url)
            .header("Content-Type", "application/json");
        if let Some(key) = &self.key {
            call = call.header("Authorization", format!("Bearer {}", key.0));
        }
        let mut response = call.send(body).map_err(AttemptError::from_transport)?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let text = response
            .body_mut()
            .with_config()
            .limit(MAX_RESPONSE_BYTES)
            .lossy_utf8(true)
            .read_to_string()
            .map_err(AttemptError::from_transport)?;
        let secret = self.key.as_ref().map(|k| k.0.as_str());
        if !(200..300).contains(&status) {
            return Err(AttemptError::Status {
                status,
                excerpt: excerpt(&text, secret),
                retry_after,
            });
        }
        parse_completion(&text).map_err(|what| AttemptError::Malformed {
            what,
            excerpt: excerpt(&text, secret),
        })
    }

    /// The query in the server's answer, post-processed; an answer with none is a
    /// failure naming the passage and showing the answer.
    fn finish(&self, request: &GenerationRequest, completion: Completion) -> Generated {
        super::postprocess::outcome(
            &request.passage.id,
            completion.content,
            completion.completion_tokens,
        )
    }

    fn failed(&self, request: &GenerationRequest, error: &str, attempts: u32) -> Generated {
        let plural = if attempts == 1 { "" } else { "s" };
        Generated::Failed {
            reason: format!(
                "passage `{}`, query type `{}`: {error} (after {attempts} attempt{plural} at {})",
                request.passage.id, request.query_type, self.url
            ),
        }
    }
}

fn check_options(options: &EndpointOptions) -> Result<(), EndpointError> {
    let bad = |field, reason: String| Err(EndpointError::BadOption { field, reason });
    if options.model.trim().is_empty() {
        return bad("model", "is empty".into());
    }
    if !(1..=MAX_CONCURRENCY).contains(&options.concurrency) {
        return bad(
            "concurrency",
            format!("is {}, must be 1 to {MAX_CONCURRENCY}", options.concurrency),
        );
    }
    if options.timeout.is_zero() {
        return bad("timeout", "is zero".into());
    }
    let s = &options.sampling;
    if !(s.temperature.is_finite() && s.temperature >= 0.0) {
        return bad("temperature", format!("is {}, must be >= 0", s.temperature));
    }
    if !(s.top_p > 0.0 && s.top_p <= 1.0) {
        return bad("top_p", format!("is {}, must be in (0, 1]", s.top_p));
    }
    if s.max_new_tokens == 0 {
        return bad("max_new_tokens", "is 0".into());
    }
    if let Some(i) = options.stop.iter().position(String::is_empty) {
        return bad("stop", format!("string {i} is empty"));
    }
    Ok(())
}

/// The key from the variable `name`; the errors name the variable, never the value.
fn read_key(name: &str) -> Result<ApiKey, EndpointError> {
    let not_set = || EndpointError::KeyNotSet {
        name: name.to_string(),
    };
    if name.is_empty() {
        return Err(not_set());
    }
    let value = std::env::var(name).map_err(|_| not_set())?;
    let value = value.trim();
    if value.is_empty() {
        return Err(EndpointError::BadKey {
            name: name.to_string(),
            reason: "empty",
        });
    }
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(EndpointError::BadKey {
            name: name.to_string(),
            reason: "not printable ASCII without spaces",
        });
    }
    Ok(ApiKey(value.to_string()))
}

impl QueryGenerator for EndpointGenerator {
    /// The URL, the model and the sampling settings; not the key. The request's seed is
    /// part of every cache key on its own; `seed=fold31` records how it is sent.
    fn id(&self) -> String {
        let s = &self.options.sampling;
        format!(
            "endpoint(url={:?}, model={:?}, temperature={}, top_p={}, max_tokens={}, stop={:?}, seed=fold{WIRE_SEED_BITS})",
            self.url, self.options.model, s.temperature, s.top_p, s.max_new_tokens, self.options.stop
        )
    }

    fn generate(&self, requests: &[GenerationRequest]) -> Result<Vec<Generated>, EngineError> {
        let workers = self.options.concurrency.min(requests.len());
        let next = AtomicUsize::new(0);
        let mut outcomes: Vec<Option<Generated>> = vec![None; requests.len()];
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..workers)
                .map(|_| {
                    scope.spawn(|| {
                        let mut done = Vec::new();
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            let Some(request) = requests.get(i) else {
                                return done;
                            };
                            done.push((i, self.generate_one(request)));
                        }
                    })
                })
                .collect();
            for handle in handles {
                match handle.join() {
                    Ok(done) => {
                        for (i, outcome) in done {
                            outcomes[i] = Some(outcome);
                        }
                    }
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
        });
        outcomes
            .into_iter()
            .zip(requests)
            .map(|(outcome, request)| {
                outcome.ok_or_else(|| {
                    EngineError::Dataflow(format!(
                        "endpoint generator: passage `{}`, query type `{}` got no outcome. This is a bug.",
                        request.passage.id, request.query_type
                    ))
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_checked_and_name_the_field() {
        let ok = EndpointOptions::new("http://localhost:8000/v1/", "m");
        let g = EndpointGenerator::new(ok.clone()).unwrap();
        assert_eq!(g.url, "http://localhost:8000/v1/chat/completions");

        let err = |o: EndpointOptions| EndpointGenerator::new(o).unwrap_err().to_string();
        assert!(err(EndpointOptions::new("localhost:8000", "m")).contains("http://"));
        assert!(err(EndpointOptions::new("http://", "m")).contains("no host"));
        assert!(err(EndpointOptions::new("http://h/v1", " ")).contains("`model`"));
        let mut o = ok.clone();
        o.concurrency = 0;
        assert!(err(o).contains("`concurrency`: is 0"));
        let mut o = ok.clone();
        o.sampling.top_p = 0.0;
        assert!(err(o).contains("`top_p`"));
        let mut o = ok.clone();
        o.sampling.temperature = f64::NAN;
        assert!(err(o).contains("`temperature`"));
        let mut o = ok;
        o.stop = vec!["x".into(), String::new()];
        assert!(err(o).contains("string 1 is empty"));
    }

    #[test]
    fn a_missing_key_variable_is_named() {
        let mut o = EndpointOptions::new("http://h/v1", "m");
        o.api_key_env = Some("DISTILLERY_TEST_KEY_THAT_IS_NEVER_SET".into());
        let e = EndpointGenerator::new(o).unwrap_err();
        assert_eq!(
            e,
            EndpointError::KeyNotSet {
                name: "DISTILLERY_TEST_KEY_THAT_IS_NEVER_SET".into()
            }
        );
    }

    #[test]
    fn id_changes_with_what_changes_outputs() {
        let base = EndpointOptions::new("http://h/v1", "m");
        let id = |o: EndpointOptions| EndpointGenerator::new(o).unwrap().id();
        let a = id(base.clone());
        let mut o = base.clone();
        o.model = "m2".into();
        assert_ne!(a, id(o));
        let mut o = base.clone();
        o.sampling.temperature = 0.7;
        assert_ne!(a, id(o));
        let mut o = base.clone();
        o.stop = vec!["\n".into()];
        assert_ne!(a, id(o));
        // Concurrency, retries and timeouts do not change what is generated.
        let mut o = base.clone();
        o.concurrency = 3;
        o.max_retries = 0;
        assert_eq!(a, id(o));
        assert_eq!(
            a,
            "endpoint(url=\"http://h/v1/chat/completions\", model=\"m\", temperature=0.8, top_p=1, max_tokens=50, stop=[], seed=fold31)"
        );
    }
}
