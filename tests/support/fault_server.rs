//! A local OpenAI-compatible chat completions server that answers from a script, to test
//! clients against faults: delays, error statuses, `Retry-After`, malformed bodies and
//! connections closed without an answer.
//!
//! Each request is keyed by the content of its last message; the script is called with
//! that key and how many requests with the same key came before (0 for the first), so a
//! test scripts each request's attempts independently of the order in which concurrent
//! requests arrive. Every connection serves one request and is closed
//! (`Connection: close`). The server records every request (headers, JSON body, arrival
//! time) and the most requests it held at once: a request counts from the moment it has
//! been read until just before its answer is written, so a client that waits for answers
//! is never seen holding more than it has in flight.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What the server does with one request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// 200 with a chat completion whose content is this; `usage.completion_tokens` when
    /// given.
    Ok {
        content: String,
        completion_tokens: Option<u64>,
    },
    /// This status with this body, and a `Retry-After` header when given.
    Status {
        status: u16,
        body: String,
        retry_after: Option<String>,
    },
    /// 200 with this body as is (for malformed answers).
    Body(String),
    /// Wait, then do the inner reply (if the client is still there).
    Delay(Duration, Box<Reply>),
    /// Close the connection without answering.
    Close,
}

impl Reply {
    pub fn ok(content: &str) -> Reply {
        Reply::Ok {
            content: content.to_string(),
            completion_tokens: None,
        }
    }

    pub fn status(status: u16, body: &str) -> Reply {
        Reply::Status {
            status,
            body: body.to_string(),
            retry_after: None,
        }
    }
}

/// One request as the server received it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The content of the request's last message.
    pub key: String,
    /// Requests with the same key before this one.
    pub attempt: usize,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub path: String,
    pub body: serde_json::Value,
    /// Since the server started.
    pub at: Duration,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

type Script = dyn Fn(&str, usize) -> Reply + Send + Sync;

struct Shared {
    script: Box<Script>,
    seen: Mutex<Vec<Seen>>,
    per_key: Mutex<HashMap<String, usize>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    started: Instant,
    stop: AtomicBool,
}

/// The server; stops accepting when dropped.
pub struct FaultServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl FaultServer {
    /// Listens on a free port of 127.0.0.1 and answers every request as `script` says.
    pub fn start(script: impl Fn(&str, usize) -> Reply + Send + Sync + 'static) -> FaultServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            script: Box::new(script),
            seen: Mutex::new(Vec::new()),
            per_key: Mutex::new(HashMap::new()),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            started: Instant::now(),
            stop: AtomicBool::new(false),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if shared.stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(stream) = stream else { continue };
                    let shared = Arc::clone(&shared);
                    std::thread::spawn(move || serve(stream, &shared));
                }
            })
        };
        FaultServer {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// `http://127.0.0.1:<port>/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Every request received so far, in arrival order.
    pub fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap().clone()
    }

    /// How many requests with this key arrived.
    pub fn count(&self, key: &str) -> usize {
        self.seen().iter().filter(|s| s.key == key).count()
    }

    /// The most requests held at once.
    pub fn max_in_flight(&self) -> usize {
        self.shared.max_in_flight.load(Ordering::SeqCst)
    }
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the acceptor so it sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn serve(stream: TcpStream, shared: &Shared) {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let Some((path, headers, body)) = read_request(&stream) else {
        return;
    };
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    let key = body
        .get("messages")
        .and_then(|m| m.as_array())
        .and_then(|m| m.last())
        .and_then(|m| m.get("content"))
        .and_then(|c| c.as_str())
        .unwrap_or("")
        .to_string();
    let attempt = {
        let mut per_key = shared.per_key.lock().unwrap();
        let n = per_key.entry(key.clone()).or_insert(0);
        *n += 1;
        *n - 1
    };
    let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    shared.max_in_flight.fetch_max(now, Ordering::SeqCst);
    shared.seen.lock().unwrap().push(Seen {
        key: key.clone(),
        attempt,
        headers,
        path,
        body,
        at: shared.started.elapsed(),
    });
    let mut reply = (shared.script)(&key, attempt);
    while let Reply::Delay(wait, inner) = reply {
        std::thread::sleep(wait);
        reply = *inner;
    }
    shared.in_flight.fetch_sub(1, Ordering::SeqCst);
    let mut stream = stream;
    let (status, body, extra) = match reply {
        Reply::Ok {
            content,
            completion_tokens,
        } => {
            let mut completion = serde_json::json!({
                "id": "chatcmpl-test",
                "object": "chat.completion",
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop"
                }]
            });
            if let Some(n) = completion_tokens {
                completion["usage"] =
                    serde_json::json!({"prompt_tokens": 10, "completion_tokens": n});
            }
            (200, completion.to_string(), String::new())
        }
        Reply::Status {
            status,
            body,
            retry_after,
        } => {
            let extra = retry_after
                .map(|v| format!("Retry-After: {v}\r\n"))
                .unwrap_or_default();
            (status, body, extra)
        }
        Reply::Body(body) => (200, body, String::new()),
        Reply::Close => return,
        Reply::Delay(..) => unreachable!("delays are unwrapped above"),
    };
    let head = format!(
        "HTTP/1.1 {status} Scripted\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    );
    // The client may have given up (a timeout test): write errors are expected then.
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body.as_bytes());
    let _ = stream.flush();
}

/// The path, headers (names lower-cased) and body of one HTTP/1.1 request.
type Request = (String, Vec<(String, String)>, Vec<u8>);

/// One request, or `None` when the client went away first.
fn read_request(stream: &TcpStream) -> Option<Request> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let path = line.split_whitespace().nth(1)?.to_string();
    let mut headers = Vec::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            break;
        }
        let (name, value) = trimmed.split_once(':')?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let body = if let Some(len) = header("content-length") {
        let mut body = vec![0u8; len.parse().ok()?];
        reader.read_exact(&mut body).ok()?;
        body
    } else if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        let mut body = Vec::new();
        loop {
            line.clear();
            reader.read_line(&mut line).ok()?;
            let size = usize::from_str_radix(line.trim(), 16).ok()?;
            let mut chunk = vec![0u8; size + 2];
            reader.read_exact(&mut chunk).ok()?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
        body
    } else {
        Vec::new()
    };
    Some((path, headers, body))
}
