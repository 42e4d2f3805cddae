//! Query generation (RECIPE.md sections 1 and 2): prepared passages in, synthetic queries
//! out.
//!
//! A [`QueryGenerator`] turns [`GenerationRequest`]s into [`Generated`] outcomes. The
//! request carries everything any generator needs: the prepared passage (for the
//! extractive baseline), the chat messages built from the prompt of its query type (for
//! LLMs, in-process or behind an endpoint) and the seed derived for it. A request that
//! fails is an outcome ([`Generated::Failed`]) with its reason, never dropped; only a
//! failure of the generator itself (a model that cannot run) stops the stage.

use distillery_operators::llm::ChatMessage;

pub mod cache;
pub mod endpoint;
pub mod extractive;
pub mod llm;
pub mod postprocess;
pub mod prepare;
pub mod prompts;
pub mod queries_table;

use crate::error::EngineError;

/// A passage ready for generation: truncated, de-duplicated, sampled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedPassage {
    pub id: String,
    pub title: String,
    /// The text, truncated to the configured number of characters.
    pub text: String,
    /// Content hash of what generation sees (title and truncated text): the cache key's
    /// passage part, so an edited passage regenerates and a moved one does not.
    pub hash: String,
}

/// One query to generate: a passage and a query type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerationRequest {
    pub passage: PreparedPassage,
    /// The query type's name (`question`, `claim`, ... or a user-defined one).
    pub query_type: String,
    /// The prompt of that type for this passage, few-shot examples drawn.
    pub messages: Vec<ChatMessage>,
    /// Seed derived from (passage hash, query type, run seed).
    pub seed: u64,
}

/// What generating one request gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Generated {
    /// A query, post-processed (first non-empty line, a leading label such as
    /// `Query:` and surrounding quotes stripped).
    Query {
        text: String,
        /// The generator's raw output, before post-processing.
        raw: String,
        /// New tokens generated (0 where a generator does not count tokens).
        tokens: usize,
    },
    /// No query: the reason, naming the passage (a request that failed after its
    /// retries, an empty output, a malformed response with its body).
    Failed { reason: String },
}

/// Something that writes queries for passages.
pub trait QueryGenerator: Send + Sync {
    /// Identifies the generator and everything that changes its outputs besides the
    /// request (model fingerprint, sampling settings): part of every cache key.
    fn id(&self) -> String;

    /// What a request's outcome depends on besides its passage's own text, its query
    /// type, the generator's id, the prompt and the seed, as a hash; `None` (the default)
    /// when nothing else. Part of the request's cache key, so a request is generated again
    /// exactly when something it depends on changed.
    fn request_inputs(&self, _passage: &PreparedPassage, _query_type: &str) -> Option<String> {
        None
    }

    /// [`Self::request_inputs`] of `passage` for each of `query_types`, in order: a
    /// generator whose types share their inputs computes them once per passage.
    fn request_inputs_of_types(
        &self,
        passage: &PreparedPassage,
        query_types: &[&str],
    ) -> Vec<Option<String>> {
        query_types
            .iter()
            .map(|t| self.request_inputs(passage, t))
            .collect()
    }

    /// One outcome per request, in order. `Err` only when the generator itself cannot
    /// go on; a request's own failure is a [`Generated::Failed`].
    fn generate(&self, requests: &[GenerationRequest]) -> Result<Vec<Generated>, EngineError>;

    /// Whether it reads a request's prompt ([`GenerationRequest::messages`]): a generator
    /// that does not (the extractive one) is handed requests without one, which saves
    /// writing out a prompt per request.
    fn reads_prompts(&self) -> bool {
        true
    }

    /// The device the generator's model runs on, when it runs one here (a local LLM):
    /// each call then holds that device through its executor. `None` for generators
    /// that run no model here (extractive, a remote endpoint).
    fn device(&self) -> Option<&candle_core::Device> {
        None
    }
}
