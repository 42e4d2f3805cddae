//! The OpenAI chat completions wire format: the request body we send and what we read
//! back. Only fields every compatible server (vLLM, llama.cpp's server, Ollama, TGI,
//! OpenAI) accepts are sent; only `choices[0].message.content` and
//! `usage.completion_tokens` are read, anything else in a response is ignored.

use distillery_operators::llm::{ChatMessage, SamplingParams};
use serde::Serialize;

/// The body of `POST {base_url}/chat/completions`.
#[derive(Debug, Serialize)]
pub struct ChatRequest<'a> {
    pub model: &'a str,
    pub messages: &'a [ChatMessage],
    pub temperature: f64,
    pub top_p: f64,
    /// `max_new_tokens`. (`min_new_tokens` has no field in the API and is not sent.)
    pub max_tokens: usize,
    pub seed: u64,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub stop: &'a [String],
    pub n: u32,
    pub stream: bool,
}

impl<'a> ChatRequest<'a> {
    pub fn new(
        model: &'a str,
        messages: &'a [ChatMessage],
        sampling: &SamplingParams,
        stop: &'a [String],
        seed: u64,
    ) -> Self {
        ChatRequest {
            model,
            messages,
            temperature: sampling.temperature,
            top_p: sampling.top_p,
            max_tokens: sampling.max_new_tokens,
            seed: wire_seed(seed),
            stop,
            n: 1,
            stream: false,
        }
    }
}

/// Servers read `seed` into narrower integers than our 64-bit seeds: llama.cpp into a
/// 32-bit unsigned, vLLM into a signed 64-bit, some into a signed 32-bit. So the seed is
/// folded (high half xor low half) into 31 bits, a value every server takes as itself.
pub const WIRE_SEED_BITS: u32 = 31;

/// The request's seed as sent: a function of all 64 bits, below 2^31.
pub fn wire_seed(seed: u64) -> u64 {
    ((seed >> 32) ^ (seed & 0xFFFF_FFFF)) & ((1u64 << WIRE_SEED_BITS) - 1)
}

/// What a chat completion gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub content: String,
    /// `usage.completion_tokens`, 0 when the server does not report it.
    pub completion_tokens: usize,
}

/// Reads a 2xx body as a chat completion; `Err` says what is missing.
pub fn parse_completion(body: &str) -> Result<Completion, String> {
    let value: serde_json::Value =
        serde_json::from_str(body).map_err(|e| format!("not JSON: {e}"))?;
    let choices = value
        .get("choices")
        .ok_or("no `choices` field")?
        .as_array()
        .ok_or("`choices` is not a list")?;
    let first = choices.first().ok_or("`choices` is empty")?;
    let content = first
        .pointer("/message/content")
        .ok_or("no `choices[0].message.content`")?
        .as_str()
        .ok_or("`choices[0].message.content` is not a string")?;
    let completion_tokens = value
        .pointer("/usage/completion_tokens")
        .and_then(serde_json::Value::as_u64)
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(0);
    Ok(Completion {
        content: content.to_string(),
        completion_tokens,
    })
}

/// The start of a response body for an error message: at most this many characters.
pub const BODY_EXCERPT_CHARS: usize = 200;

/// The first [`BODY_EXCERPT_CHARS`] characters of `body`, with `…` when cut, and every
/// occurrence of `secret` (the API key, should a server echo it) replaced.
pub fn excerpt(body: &str, secret: Option<&str>) -> String {
    let redacted = match secret {
        Some(key) if !key.is_empty() && body.contains(key) => body.replace(key, "<redacted>"),
        _ => body.to_string(),
    };
    match redacted.char_indices().nth(BODY_EXCERPT_CHARS) {
        Some((cut, _)) => format!("{}…", &redacted[..cut]),
        None => redacted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_body_has_the_openai_fields() {
        let messages = vec![ChatMessage::new("user", "hi")];
        let sampling = SamplingParams {
            temperature: 0.8,
            top_p: 0.95,
            max_new_tokens: 50,
            min_new_tokens: 1,
        };
        let stop = vec!["\n\n".to_string()];
        let body =
            serde_json::to_value(ChatRequest::new("m", &messages, &sampling, &stop, 42)).unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "model": "m",
                "messages": [{"role": "user", "content": "hi"}],
                "temperature": 0.8, "top_p": 0.95, "max_tokens": 50, "seed": 42,
                "stop": ["\n\n"], "n": 1, "stream": false
            })
        );
        let no_stop =
            serde_json::to_value(ChatRequest::new("m", &messages, &sampling, &[], 1)).unwrap();
        assert!(no_stop.get("stop").is_none());
    }

    #[test]
    fn seeds_fold_into_31_bits() {
        assert_eq!(wire_seed(42), 42);
        // 0x1_0000_0003: high half 1, low half 3, xor 2.
        assert_eq!(wire_seed(0x1_0000_0003), 2);
        // 0xFFFF_FFFF xor 0 keeps the low 31 bits: 0x7FFF_FFFF.
        assert_eq!(wire_seed(0xFFFF_FFFF), 0x7FFF_FFFF);
        assert_eq!(wire_seed(u64::MAX), 0);
    }

    #[test]
    fn completions_and_what_makes_them_malformed() {
        let ok = r#"{"id":"x","choices":[{"index":0,"message":{"role":"assistant","content":"what is rust"},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":4}}"#;
        assert_eq!(
            parse_completion(ok),
            Ok(Completion {
                content: "what is rust".into(),
                completion_tokens: 4
            })
        );
        let no_usage = r#"{"choices":[{"message":{"content":"q"}}]}"#;
        assert_eq!(parse_completion(no_usage).unwrap().completion_tokens, 0);

        let cases = [
            ("<html>502</html>", "not JSON"),
            (
                r#"{"error":{"message":"overloaded"}}"#,
                "no `choices` field",
            ),
            (r#"{"choices":{}}"#, "`choices` is not a list"),
            (r#"{"choices":[]}"#, "`choices` is empty"),
            (
                r#"{"choices":[{"text":"q"}]}"#,
                "no `choices[0].message.content`",
            ),
            (
                r#"{"choices":[{"message":{"content":null}}]}"#,
                "`choices[0].message.content` is not a string",
            ),
        ];
        for (body, why) in cases {
            let err = parse_completion(body).unwrap_err();
            assert!(err.starts_with(why), "{body}: {err}");
        }
    }

    #[test]
    fn excerpts_are_cut_on_characters_and_redact_the_key() {
        let long = "é".repeat(BODY_EXCERPT_CHARS + 5);
        let cut = excerpt(&long, None);
        assert_eq!(cut.chars().count(), BODY_EXCERPT_CHARS + 1);
        assert!(cut.ends_with('…'));
        assert_eq!(excerpt("short", None), "short");
        assert_eq!(
            excerpt("bad key sk-123 given", Some("sk-123")),
            "bad key <redacted> given"
        );
    }
}
