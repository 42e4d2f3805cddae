//! The endpoint generator against a local fault-injecting server (timeouts, 429 with
//! `Retry-After`, 500, 503, 400, malformed bodies, connections closed or refused), and
//! against llama-cpp-python's OpenAI-compatible server on a tiny GGUF where that is
//! installed.
//!
//! The real-server test needs a Python with `llama_cpp.server`: the interpreter is
//! `$DISTILLERY_PEERS_PYTHON`, else `/root/.cache/distillery-peers/bin/python` when it
//! exists. Without one (or without the GGUF fixture) it prints `SKIPPED: <reason>` to
//! stderr and passes.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod support;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use distillery::generate::endpoint::{
    wire_seed, Backoff, EndpointGenerator, EndpointOptions, MALFORMED_ATTEMPTS,
};
use distillery::generate::{Generated, GenerationRequest, PreparedPassage, QueryGenerator};
use distillery_operators::llm::ChatMessage;
use support::fault_server::{FaultServer, Reply};

/// Retries in these tests; so a request that always fails is sent 3 times.
const RETRIES: u32 = 2;

/// Options with short waits, so the fault tests take a few seconds at most. The timeout
/// leaves a loaded machine (parallel tests, other builds) ample time for a local answer.
fn fast_options(base_url: &str) -> EndpointOptions {
    let mut options = EndpointOptions::new(base_url, "test-model");
    options.concurrency = 4;
    options.timeout = Duration::from_millis(750);
    options.max_retries = RETRIES;
    options.backoff = Backoff {
        initial: Duration::from_millis(2),
        max: Duration::from_millis(10),
        retry_after_cap: Duration::from_millis(300),
        jitter: true,
    };
    options
}

/// A request for passage `id` whose last message is `id`, the key the server scripts by.
fn request(id: &str, seed: u64) -> GenerationRequest {
    GenerationRequest {
        passage: PreparedPassage {
            id: id.to_string(),
            title: String::new(),
            text: format!("text of {id}"),
            hash: format!("hash-{id}"),
        },
        query_type: "question".to_string(),
        messages: vec![
            ChatMessage::new("system", "Write a search query for the passage."),
            ChatMessage::new("user", id),
        ],
        seed,
    }
}

fn generator(options: EndpointOptions) -> EndpointGenerator {
    EndpointGenerator::new(options).unwrap()
}

fn raw_of(outcome: &Generated) -> &str {
    match outcome {
        Generated::Query { raw, .. } => raw,
        Generated::Failed { reason } => panic!("expected a query, got a failure: {reason}"),
    }
}

fn reason_of(outcome: &Generated) -> &str {
    match outcome {
        Generated::Failed { reason } => reason,
        Generated::Query { raw, .. } => panic!("expected a failure, got a query: {raw:?}"),
    }
}

#[test]
fn successes_carry_content_tokens_and_the_request_fields() {
    let server = FaultServer::start(|key, _| match key {
        "p0" => Reply::Ok {
            content: "what is p0".into(),
            completion_tokens: Some(7),
        },
        _ => Reply::ok(&format!("what is {key}")),
    });
    let g = generator(fast_options(&server.base_url()));
    let seed = 0x1234_5678_9ABC_DEF0;
    let out = g
        .generate(&[request("p0", seed), request("p1", 2)])
        .unwrap();
    assert_eq!(out.len(), 2);
    match &out[0] {
        Generated::Query { raw, tokens, .. } => {
            assert_eq!(raw, "what is p0");
            assert_eq!(*tokens, 7);
        }
        other => panic!("{other:?}"),
    }
    match &out[1] {
        // No `usage` in the answer: 0 tokens.
        Generated::Query { raw, tokens, .. } => {
            assert_eq!(raw, "what is p1");
            assert_eq!(*tokens, 0);
        }
        other => panic!("{other:?}"),
    }

    let seen = server.seen();
    assert_eq!(seen.len(), 2);
    let p0 = seen.iter().find(|s| s.key == "p0").unwrap();
    assert_eq!(p0.path, "/v1/chat/completions");
    assert_eq!(p0.header("content-type"), Some("application/json"));
    assert_eq!(p0.header("authorization"), None);
    let b = &p0.body;
    assert_eq!(b["model"], "test-model");
    assert_eq!(b["temperature"], 0.8);
    assert_eq!(b["top_p"], 1.0);
    assert_eq!(b["max_tokens"], 50);
    assert_eq!(b["n"], 1);
    assert_eq!(b["stream"], false);
    // 0x12345678 ^ 0x9ABCDEF0 = 0x88888888, low 31 bits 0x08888888.
    assert_eq!(b["seed"], 0x0888_8888u64);
    assert_eq!(b["seed"], wire_seed(seed));
    assert_eq!(b["messages"][1]["content"], "p0");
    assert_eq!(b["messages"][0]["role"], "system");
    assert!(b.get("stop").is_none());
}

#[test]
fn transient_failures_are_retried_then_succeed() {
    let server = FaultServer::start(|key, attempt| match (key, attempt) {
        ("e500", 0) => Reply::status(500, "internal error"),
        ("e503", 0 | 1) => Reply::status(503, "loading model"),
        ("closed", 0) => Reply::Close,
        ("slow", 0) => Reply::Delay(Duration::from_secs(2), Box::new(Reply::ok("late"))),
        ("nochoices", 0) => Reply::Body(r#"{"object":"chat.completion"}"#.into()),
        ("garbage", 0) => Reply::Body("<html>bad gateway</html>".into()),
        _ => Reply::ok(&format!("q {key}")),
    });
    let g = generator(fast_options(&server.base_url()));
    let keys = [
        "e500",
        "e503",
        "closed",
        "slow",
        "nochoices",
        "garbage",
        "fine",
    ];
    let requests: Vec<_> = keys.iter().map(|k| request(k, 1)).collect();
    let out = g.generate(&requests).unwrap();
    for (key, outcome) in keys.iter().zip(&out) {
        assert_eq!(raw_of(outcome), format!("q {key}"), "{key}");
    }
    let expected_requests = [
        ("e500", 2),
        ("e503", 3),
        ("closed", 2),
        ("slow", 2),
        ("nochoices", 2),
        ("garbage", 2),
        ("fine", 1),
    ];
    for (key, n) in expected_requests {
        assert_eq!(server.count(key), n, "{key}");
    }
    let e503: Vec<usize> = server
        .seen()
        .iter()
        .filter(|s| s.key == "e503")
        .map(|s| s.attempt)
        .collect();
    assert_eq!(e503, vec![0, 1, 2]);
}

#[test]
fn persistent_failures_are_recorded_with_passage_status_and_attempts() {
    let server = FaultServer::start(|key, _| match key {
        "e500" => Reply::status(500, "{\"error\":\"CUDA out of memory\"}"),
        "e429" => Reply::status(429, "slow down"),
        "e400" => Reply::status(400, "{\"error\":\"unknown model test-model\"}"),
        "e404" => Reply::status(404, "not found"),
        "garbage" => Reply::Body("this is not json".into()),
        "closed" => Reply::Close,
        "slow" => Reply::Delay(Duration::from_secs(2), Box::new(Reply::ok("late"))),
        _ => Reply::ok("fine"),
    });
    let g = generator(fast_options(&server.base_url()));
    let keys = ["e500", "e429", "e400", "e404", "garbage", "closed", "slow"];
    let requests: Vec<_> = keys.iter().map(|k| request(k, 1)).collect();
    let out = g.generate(&requests).unwrap();
    assert_eq!(out.len(), keys.len());
    let all = RETRIES + 1;
    let expect = [
        ("e500", all, "HTTP status 500, body \"{\\\"error\\\":\\\"CUDA out of memory\\\"}\""),
        ("e429", all, "HTTP status 429, body \"slow down\""),
        // Other 4xx: the request is wrong, one attempt.
        ("e400", 1, "HTTP status 400, body \"{\\\"error\\\":\\\"unknown model test-model\\\"}\""),
        ("e404", 1, "HTTP status 404, body \"not found\""),
        (
            "garbage",
            MALFORMED_ATTEMPTS,
            "malformed response (not JSON: expected ident at line 1 column 2), body \"this is not json\"",
        ),
        ("closed", all, "connection"),
        ("slow", all, "timed out"),
    ];
    for ((key, attempts, error), outcome) in expect.iter().zip(&out) {
        let reason = reason_of(outcome);
        assert!(
            reason.starts_with(&format!("passage `{key}`, query type `question`: ")),
            "{reason}"
        );
        assert!(reason.contains(error), "{key}: {reason}");
        let plural = if *attempts == 1 { "" } else { "s" };
        assert!(
            reason.contains(&format!(
                "(after {attempts} attempt{plural} at http://127.0.0.1:"
            )),
            "{key}: {reason}"
        );
        assert_eq!(server.count(key), *attempts as usize, "{key}");
    }
}

#[test]
fn retry_after_is_honoured_up_to_its_cap() {
    let server = FaultServer::start(|key, attempt| match (key, attempt) {
        // Asks for 1 s; the options cap it at 300 ms.
        ("capped", 0) => Reply::Status {
            status: 429,
            body: "rate limited".into(),
            retry_after: Some("1".into()),
        },
        // Asks for 0 s: retried at once, not after the backoff's 600 ms.
        ("zero", 0) => Reply::Status {
            status: 429,
            body: "rate limited".into(),
            retry_after: Some("0".into()),
        },
        _ => Reply::ok("ok"),
    });
    let mut options = fast_options(&server.base_url());
    options.backoff.initial = Duration::from_millis(600);
    options.backoff.max = Duration::from_millis(600);
    options.backoff.jitter = false;
    let g = generator(options);
    let out = g
        .generate(&[request("capped", 1), request("zero", 1)])
        .unwrap();
    assert_eq!(raw_of(&out[0]), "ok");
    assert_eq!(raw_of(&out[1]), "ok");
    let seen = server.seen();
    let gap = |key: &str| {
        let times: Vec<Duration> = seen.iter().filter(|s| s.key == key).map(|s| s.at).collect();
        assert_eq!(times.len(), 2, "{key}");
        times[1] - times[0]
    };
    // Not the backoff (600 ms), not the full ask (1 s): the cap (300 ms).
    let capped = gap("capped");
    assert!(
        capped >= Duration::from_millis(300) && capped < Duration::from_millis(600),
        "{capped:?}"
    );
    let zero = gap("zero");
    assert!(zero < Duration::from_millis(300), "{zero:?}");
}

#[test]
fn order_is_kept_and_concurrency_is_bounded() {
    // Answers take 40 ms and the slower the lower the index, so answers finish out of
    // order.
    let server = FaultServer::start(|key, attempt| {
        let i: u64 = key.trim_start_matches('p').parse().unwrap();
        if i.is_multiple_of(5) && attempt == 0 {
            return Reply::status(502, "bad gateway");
        }
        Reply::Delay(
            Duration::from_millis(40 + (24 - i) * 2),
            Box::new(Reply::ok(&format!("query {i}"))),
        )
    });
    let mut options = fast_options(&server.base_url());
    options.concurrency = 3;
    options.timeout = Duration::from_secs(5);
    let g = generator(options);
    let requests: Vec<_> = (0..24).map(|i| request(&format!("p{i}"), i)).collect();
    let out = g.generate(&requests).unwrap();
    assert_eq!(out.len(), 24);
    for (i, outcome) in out.iter().enumerate() {
        assert_eq!(raw_of(outcome), format!("query {i}"));
    }
    assert_eq!(server.seen().len(), 24 + 5);
    let most = server.max_in_flight();
    assert!(most <= 3, "{most} requests in flight with concurrency 3");
    assert!(most >= 2, "requests never overlapped: {most}");

    // An empty batch is no work and no error.
    assert!(g.generate(&[]).unwrap().is_empty());
}

#[test]
fn connection_refused_is_retried_then_recorded() {
    // A port that had a listener a moment ago and now has none.
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let g = generator(fast_options(&format!("http://127.0.0.1:{port}/v1")));
    let out = g.generate(&[request("p7", 1), request("p8", 2)]).unwrap();
    assert_eq!(out.len(), 2);
    for (key, outcome) in ["p7", "p8"].iter().zip(&out) {
        let reason = reason_of(outcome);
        assert!(
            reason.starts_with(&format!(
                "passage `{key}`, query type `question`: connection"
            )),
            "{reason}"
        );
        assert!(
            reason.contains(&format!("(after {} attempts", RETRIES + 1)),
            "{reason}"
        );
    }
}

#[test]
fn the_key_is_sent_as_bearer_and_shown_nowhere() {
    const VAR: &str = "DISTILLERY_ENDPOINT_TEST_KEY";
    const KEY: &str = "sk-test-Zq8v3SECRET";
    // No other test of this binary reads or writes this variable.
    std::env::set_var(VAR, KEY);
    // The server answers 401 and echoes the key, as a careless proxy might.
    let server = FaultServer::start(|key, _| match key {
        "echo" => Reply::status(401, &format!("invalid key {KEY}")),
        _ => Reply::ok("fine"),
    });
    let mut options = fast_options(&server.base_url());
    options.api_key_env = Some(VAR.to_string());
    let g = generator(options);
    let out = g.generate(&[request("ok", 1), request("echo", 1)]).unwrap();
    assert_eq!(raw_of(&out[0]), "fine");
    let reason = reason_of(&out[1]);
    assert!(
        reason.contains("HTTP status 401, body \"invalid key <redacted>\""),
        "{reason}"
    );
    for s in server.seen() {
        assert_eq!(
            s.header("authorization"),
            Some(format!("Bearer {KEY}").as_str())
        );
    }
    let debug = format!("{g:?}");
    assert!(debug.contains("ApiKey(<redacted>)"), "{debug}");
    for text in [debug, g.id(), reason.to_string(), format!("{out:?}")] {
        assert!(!text.contains("SECRET"), "{text}");
    }

    // A variable that is set but empty is an error naming the variable, not a value.
    const EMPTY: &str = "DISTILLERY_ENDPOINT_TEST_EMPTY_KEY";
    std::env::set_var(EMPTY, "  ");
    let mut options = fast_options(&server.base_url());
    options.api_key_env = Some(EMPTY.to_string());
    let err = EndpointGenerator::new(options).unwrap_err().to_string();
    assert_eq!(
        err,
        format!("endpoint api_key_env: environment variable `{EMPTY}` is empty (its value is not shown)")
    );
}

#[test]
fn stop_strings_are_sent() {
    let server = FaultServer::start(|_, _| Reply::ok("q"));
    let mut options = fast_options(&server.base_url());
    options.stop = vec!["\n".to_string(), "Passage:".to_string()];
    let g = generator(options);
    g.generate(&[request("p", 1)]).unwrap();
    assert_eq!(
        server.seen()[0].body["stop"],
        serde_json::json!(["\n", "Passage:"])
    );
}

// ---------------------------------------------------------------------------------------
// A real server: llama-cpp-python's OpenAI-compatible server on a tiny GGUF.

/// The Python with llama-cpp-python, from `DISTILLERY_PEERS_PYTHON` or the default peers
/// environment.
fn peers_python() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("DISTILLERY_PEERS_PYTHON") {
        return Ok(PathBuf::from(path));
    }
    let default = PathBuf::from("/root/.cache/distillery-peers/bin/python");
    if default.exists() {
        Ok(default)
    } else {
        Err(
            "no Python: set DISTILLERY_PEERS_PYTHON to a python with llama-cpp-python[server]"
                .into(),
        )
    }
}

/// The first tiny GGUF fixture present.
fn tiny_gguf() -> Result<PathBuf, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llm");
    for dir in ["tiny-qwen2", "tiny-llama"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
            continue;
        };
        let mut ggufs: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
            .collect();
        ggufs.sort();
        if let Some(first) = ggufs.into_iter().next() {
            return Ok(first);
        }
    }
    Err(format!(
        "no *.gguf under {}/tiny-qwen2 or tiny-llama",
        root.display()
    ))
}

/// Kills the server when the test ends, however it ends.
struct ServerProcess(Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn llama_cpp_server_generates_queries() {
    let python = match peers_python() {
        Ok(p) => p,
        Err(why) => return eprintln!("SKIPPED: {why}"),
    };
    let has_server = Command::new(&python)
        // What `python -m llama_cpp.server` imports: the package imports without its
        // `[server]` extras, the server does not.
        .args(["-c", "import uvicorn, llama_cpp.server.app"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_server {
        return eprintln!(
            "SKIPPED: {} cannot import llama_cpp.server.app and uvicorn (pip install 'llama-cpp-python[server]')",
            python.display()
        );
    }
    let gguf = match tiny_gguf() {
        Ok(g) => g,
        Err(why) => return eprintln!("SKIPPED: {why}"),
    };
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = tempfile::NamedTempFile::new().unwrap();
    let child = Command::new(&python)
        .args(["-m", "llama_cpp.server", "--model"])
        .arg(&gguf)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args([
            "--n_threads",
            "1",
            "--n_ctx",
            "512",
            "--model_alias",
            "tiny",
        ])
        .env("OMP_NUM_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    let _server = ServerProcess(child);
    let base_url = format!("http://127.0.0.1:{port}/v1");

    // Wait until the model is loaded and the server answers.
    let start = Instant::now();
    loop {
        if ureq::get(&format!("{base_url}/models")).call().is_ok() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "llama_cpp.server did not come up in 120 s; its log:\n{}",
            std::fs::read_to_string(log.path()).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(250));
    }

    let mut options = EndpointOptions::new(&base_url, "tiny");
    options.concurrency = 2;
    options.timeout = Duration::from_secs(60);
    options.sampling.temperature = 0.8;
    options.sampling.max_new_tokens = 12;
    let g = EndpointGenerator::new(options).unwrap();
    let requests: Vec<_> = (0..3u64)
        .map(|i| request(&format!("passage number {i} about rivers"), 1000 + i))
        .collect();
    let first = g.generate(&requests).unwrap();
    let second = g.generate(&requests).unwrap();
    assert_eq!(first.len(), 3);
    for (i, outcome) in first.iter().enumerate() {
        match outcome {
            // The server's own count: llama-cpp-python's `usage.completion_tokens` is not
            // bounded by `max_tokens` (it reported 16 with `max_tokens` 12 here), so only
            // its presence is checked.
            Generated::Query { tokens, .. } => assert!(*tokens >= 1, "request {i}: no tokens"),
            Generated::Failed { reason } => panic!("request {i}: {reason}"),
        }
    }
    // Same seed at temperature 0.8: the same text.
    assert_eq!(first, second);
    eprintln!("llama_cpp.server on {}: {first:?}", gguf.display());
}
