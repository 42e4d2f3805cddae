//! Prompts of the query types (RECIPE.md section 2): the six built-in types and
//! user-defined ones, turned into chat messages for one passage.
//!
//! Contracts:
//! - **One user message.** A prompt is a single `user` [`ChatMessage`]: the type's
//!   instruction, the rules every type shares ([`RULES`]: under 20 words, no long phrases
//!   copied from the passage, the plain query only), the few-shot examples, and last the
//!   target passage. No `system` message: some chat templates (Gemma's) refuse one, and a
//!   single user turn renders under every template and every endpoint.
//! - **Few-shot examples** are drawn per passage from the type's pool, `shots` of them
//!   without replacement, by a generator seeded with the request's seed
//!   ([`seed_for`]): the same passage, type and run seed draw the same examples in the
//!   same order, and another passage draws others. The draw is a partial Fisher-Yates
//!   shuffle driven by SplitMix64, an index below `n` taken as the high 64 bits of
//!   `u64 * n` (deterministic; biased by at most `n / 2^64`).
//! - **The prompt hash** ([`QueryTypeSpec::prompt_hash`]) covers everything that shapes a
//!   prompt: [`TEMPLATE_VERSION`], the fixed texts of the layout, the type's name,
//!   instruction, shots, whether the title is shown and every pool example. It is part of
//!   the generation cache key, so an edited instruction or pool regenerates that type.
//! - **Built-in types** take their pools from `datasets/prompts/*.jsonl`, compiled in.
//!   `search` is zero-shot. `title` hides the passage's own title (it would be the answer).
//! - **User-defined types** come from the config: a name (ASCII letters, digits, `_` or
//!   `-`), an instruction, an examples file (JSON lines with string fields `passage` and
//!   `query`; blank lines skipped; a bad line is an error naming the file, the line and
//!   the field) and the number of shots.

mod examples;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use distillery_operators::llm::ChatMessage;

use super::{GenerationRequest, PreparedPassage};
use crate::bad_record::BadRecord;
use crate::store::ContentHasher;
use examples::{draw, parse_example_lines};

pub use examples::{read_examples, FewShotExample};

/// Bumped whenever the way [`QueryTypeSpec::messages`] lays a prompt out changes, so that
/// cached queries of the old layout are not reused.
pub const TEMPLATE_VERSION: u32 = 1;
/// Few-shot examples per prompt of the built-in types (the recipe's 3).
pub const DEFAULT_SHOTS: usize = 3;
/// The built-in query types, in the order [`PromptSet::builtin`] lists them.
pub const BUILTIN_TYPES: [&str; 6] = ["question", "claim", "title", "keywords", "search", "web"];

/// The rules every prompt states after its instruction.
pub const RULES: &str = "Rules:\n\
- Use fewer than 20 words.\n\
- Do not copy long phrases from the passage; use your own words.\n\
- Reply with the plain query only: no explanation, no label, no quotation marks.";
/// Heads the few-shot examples.
const EXAMPLES_HEADING: &str = "Examples:";
/// Introduces the target passage.
const TARGET_HEADING: &str = "Now write one for this passage.";
/// Label of a passage (examples and target).
const PASSAGE_LABEL: &str = "Passage:";
/// Label of an example's query.
const QUERY_LABEL: &str = "Query:";
/// Mixed into the request seed for the few-shot draw, so that the draw and an LLM's
/// sampler seeded with the same request seed do not start from the same state.
const FEW_SHOT_STREAM: u64 = 0x9E37_79B9_7F4A_7C15;

/// Why a query type cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    /// A name that is not one of [`BUILTIN_TYPES`].
    #[error("unknown query type `{name}`; the built-in types are question, claim, title, keywords, search and web")]
    UnknownType { name: String },
    /// The examples file could not be read.
    #[error("cannot read examples file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A line of an examples file is not an example.
    #[error(transparent)]
    Bad(#[from] BadRecord),
    /// The type as a whole does not fit together (names the type).
    #[error("query type `{name}`: {reason}")]
    Invalid { name: String, reason: String },
}

/// A query type's prompt: instruction, pool of examples, shots per prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryTypeSpec {
    name: String,
    instruction: String,
    examples: Vec<FewShotExample>,
    shots: usize,
    /// Whether the target passage's title is shown (not for `title` queries).
    show_title: bool,
}

struct Builtin {
    name: &'static str,
    instruction: &'static str,
    /// (file name for errors, contents); `None` for a zero-shot type.
    pool: Option<(&'static str, &'static str)>,
    show_title: bool,
}

const BUILTINS: [Builtin; 6] = [
    Builtin {
        name: "question",
        instruction: "Write one question that the passage below answers. Ask it the way \
                      someone who has not read the passage would.",
        pool: Some((
            "datasets/prompts/question.jsonl",
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/datasets/prompts/question.jsonl"
            )),
        )),
        show_title: true,
    },
    Builtin {
        name: "claim",
        instruction: "Write one claim that the passage below supports: a single declarative \
                      sentence stating a fact that the passage backs up.",
        pool: Some((
            "datasets/prompts/claim.jsonl",
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/datasets/prompts/claim.jsonl"
            )),
        )),
        show_title: true,
    },
    Builtin {
        name: "title",
        instruction: "Write a title for the passage below: a short heading that names what \
                      it is about.",
        pool: Some((
            "datasets/prompts/title.jsonl",
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/datasets/prompts/title.jsonl"
            )),
        )),
        show_title: false,
    },
    Builtin {
        name: "keywords",
        instruction: "Write up to 5 key phrases that someone would search with to find the \
                      passage below, separated by commas.",
        pool: Some((
            "datasets/prompts/keywords.jsonl",
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/datasets/prompts/keywords.jsonl"
            )),
        )),
        show_title: true,
    },
    Builtin {
        name: "search",
        instruction: "Write a natural search query written by an information seeker whose \
                      need the passage below meets.",
        pool: None,
        show_title: true,
    },
    Builtin {
        name: "web",
        instruction: "Write the query someone would type into a web search engine to find the \
                      passage below: short and informal, the way people really search.",
        pool: Some((
            "datasets/prompts/web.jsonl",
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/datasets/prompts/web.jsonl"
            )),
        )),
        show_title: true,
    },
];

impl QueryTypeSpec {
    /// One of the [`BUILTIN_TYPES`], with its shipped instruction and pool.
    pub fn builtin(name: &str) -> Result<Self, PromptError> {
        let builtin = BUILTINS
            .iter()
            .find(|b| b.name == name)
            .ok_or_else(|| PromptError::UnknownType { name: name.into() })?;
        let (examples, shots) = match builtin.pool {
            Some((file, contents)) => (
                parse_example_lines(Path::new(file), contents.as_bytes())?,
                DEFAULT_SHOTS,
            ),
            None => (Vec::new(), 0),
        };
        Self::checked(
            builtin.name.into(),
            builtin.instruction.into(),
            examples,
            shots,
            builtin.show_title,
        )
    }

    /// A user-defined type. `examples_path` may be `None` only when `shots` is 0; the
    /// file must hold at least `shots` examples. The passage's title is shown.
    pub fn custom(
        name: impl Into<String>,
        instruction: impl Into<String>,
        examples_path: Option<&Path>,
        shots: usize,
    ) -> Result<Self, PromptError> {
        let name = name.into();
        let examples = match examples_path {
            Some(path) => read_examples(path)?,
            None if shots > 0 => {
                return Err(PromptError::Invalid {
                    name,
                    reason: format!(
                        "asks for {shots} few-shot examples but names no examples file"
                    ),
                })
            }
            None => Vec::new(),
        };
        Self::checked(name, instruction.into(), examples, shots, true)
    }

    fn checked(
        name: String,
        instruction: String,
        examples: Vec<FewShotExample>,
        shots: usize,
        show_title: bool,
    ) -> Result<Self, PromptError> {
        let invalid = |reason: String| PromptError::Invalid {
            name: name.clone(),
            reason,
        };
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(invalid(
                "a query type's name is ASCII letters, digits, `_` and `-`, and not empty".into(),
            ));
        }
        if instruction.trim().is_empty() {
            return Err(invalid("the instruction is empty".into()));
        }
        if shots > examples.len() {
            return Err(invalid(format!(
                "asks for {shots} few-shot examples but its pool has {}",
                examples.len()
            )));
        }
        Ok(Self {
            name,
            instruction: instruction.trim().to_owned(),
            examples,
            shots,
            show_title,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn instruction(&self) -> &str {
        &self.instruction
    }

    pub fn examples(&self) -> &[FewShotExample] {
        &self.examples
    }

    pub fn shots(&self) -> usize {
        self.shots
    }

    /// blake3 (64 hex digits) of everything that shapes this type's prompts (see the
    /// module docs).
    pub fn prompt_hash(&self) -> String {
        let mut h = ContentHasher::new();
        h.field(TEMPLATE_VERSION.to_le_bytes());
        for fixed in [
            RULES,
            EXAMPLES_HEADING,
            TARGET_HEADING,
            PASSAGE_LABEL,
            QUERY_LABEL,
        ] {
            h.field(fixed);
        }
        h.field(&self.name)
            .field(&self.instruction)
            .field((self.shots as u64).to_le_bytes())
            .field([u8::from(self.show_title)])
            .field((self.examples.len() as u64).to_le_bytes());
        for example in &self.examples {
            h.field(&example.passage).field(&example.query);
        }
        h.finish()
    }

    /// The indices of the examples drawn for a request seeded with `seed`, in prompt order.
    pub fn draw_examples(&self, seed: u64) -> Vec<usize> {
        draw(self.examples.len(), self.shots, seed ^ FEW_SHOT_STREAM)
    }

    /// The chat messages for `passage`, examples drawn by `seed` (see the module docs).
    pub fn messages(&self, passage: &PreparedPassage, seed: u64) -> Vec<ChatMessage> {
        let mut prompt = format!("{}\n\n{RULES}\n\n", self.instruction);
        let drawn = self.draw_examples(seed);
        if !drawn.is_empty() {
            prompt.push_str(EXAMPLES_HEADING);
            prompt.push_str("\n\n");
            for i in drawn {
                let example = &self.examples[i];
                prompt.push_str(&format!(
                    "{PASSAGE_LABEL} {}\n{QUERY_LABEL} {}\n\n",
                    example.passage, example.query
                ));
            }
        }
        prompt.push_str(TARGET_HEADING);
        prompt.push_str("\n\n");
        prompt.push_str(PASSAGE_LABEL);
        prompt.push(' ');
        if self.show_title && !passage.title.trim().is_empty() {
            prompt.push_str(passage.title.trim());
            prompt.push('\n');
        }
        prompt.push_str(passage.text.trim());
        vec![ChatMessage::new("user", prompt)]
    }

    /// The request for `passage` under `run_seed`: seed from [`seed_for`], messages from
    /// [`Self::messages`].
    pub fn request(&self, passage: &PreparedPassage, run_seed: u64) -> GenerationRequest {
        let seed = seed_for(&passage.hash, &self.name, run_seed);
        GenerationRequest {
            passage: passage.clone(),
            query_type: self.name.clone(),
            messages: self.messages(passage, seed),
            seed,
        }
    }

    /// [`Self::request`] with no prompt (no messages), for a generator that does not read
    /// one: the same passage, type and seed.
    pub fn request_without_prompt(
        &self,
        passage: &PreparedPassage,
        run_seed: u64,
    ) -> GenerationRequest {
        GenerationRequest {
            passage: passage.clone(),
            query_type: self.name.clone(),
            messages: Vec::new(),
            seed: seed_for(&passage.hash, &self.name, run_seed),
        }
    }
}

/// The seed of one request: the first 8 bytes, little-endian, of blake3 over
/// `run_seed` (8 bytes little-endian), then the passage hash and the query type, each as
/// a length-prefixed field ([`ContentHasher::field`]).
pub fn seed_for(passage_hash: &str, query_type: &str, run_seed: u64) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(&run_seed.to_le_bytes());
    for field in [passage_hash, query_type] {
        h.update(&(field.len() as u64).to_le_bytes());
        h.update(field.as_bytes());
    }
    let bytes = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&bytes.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

/// The query types of one run, each name once, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptSet {
    types: Vec<QueryTypeSpec>,
}

impl PromptSet {
    /// Rejects a name given twice.
    pub fn new(types: Vec<QueryTypeSpec>) -> Result<Self, PromptError> {
        let mut seen = HashSet::new();
        for spec in &types {
            if !seen.insert(spec.name.as_str()) {
                return Err(PromptError::Invalid {
                    name: spec.name.clone(),
                    reason: "is listed twice".into(),
                });
            }
        }
        Ok(Self { types })
    }

    /// The six built-in types.
    pub fn builtin() -> Result<Self, PromptError> {
        Self::new(
            BUILTIN_TYPES
                .iter()
                .map(|name| QueryTypeSpec::builtin(name))
                .collect::<Result<_, _>>()?,
        )
    }

    pub fn get(&self, name: &str) -> Option<&QueryTypeSpec> {
        self.types.iter().find(|t| t.name == name)
    }

    pub fn types(&self) -> &[QueryTypeSpec] {
        &self.types
    }

    /// One request per type for `passage`, in the set's order.
    pub fn requests(&self, passage: &PreparedPassage, run_seed: u64) -> Vec<GenerationRequest> {
        self.types
            .iter()
            .map(|t| t.request(passage, run_seed))
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is its job
mod tests {
    use super::*;

    fn passage(title: &str, text: &str) -> PreparedPassage {
        PreparedPassage {
            id: "p1".into(),
            title: title.into(),
            text: text.into(),
            hash: crate::generate::prepare::passage_hash(title, text),
        }
    }

    #[test]
    fn every_builtin_pool_parses_and_keeps_the_recipe_rules() {
        let set = PromptSet::builtin().unwrap();
        let names: Vec<&str> = set.types().iter().map(|t| t.name()).collect();
        assert_eq!(names, BUILTIN_TYPES);
        for spec in set.types() {
            if spec.name() == "search" {
                assert_eq!((spec.shots(), spec.examples().len()), (0, 0));
                continue;
            }
            assert_eq!(spec.shots(), 3);
            assert_eq!(spec.examples().len(), 12, "{}", spec.name());
            for example in spec.examples() {
                let words = example.query.split_whitespace().count();
                assert!(words < 20, "{}: {}", spec.name(), example.query);
                if spec.name() == "keywords" {
                    assert!(example.query.split(',').count() <= 5, "{}", example.query);
                }
            }
        }
        assert!(matches!(
            QueryTypeSpec::builtin("poem"),
            Err(PromptError::UnknownType { .. })
        ));
    }

    #[test]
    fn seed_for_is_blake3_of_the_documented_bytes() {
        let mut bytes = 7u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(&3u64.to_le_bytes());
        bytes.extend_from_slice(b"abc");
        bytes.extend_from_slice(&5u64.to_le_bytes());
        bytes.extend_from_slice(b"title");
        let digest = blake3::hash(&bytes);
        let expected = u64::from_le_bytes(digest.as_bytes()[..8].try_into().unwrap());
        assert_eq!(seed_for("abc", "title", 7), expected);
        assert_ne!(seed_for("abc", "title", 8), expected);
        assert_ne!(seed_for("abc", "claim", 7), expected);
        // Length prefixes keep the fields apart.
        assert_ne!(seed_for("ab", "ctitle", 7), expected);
    }

    #[test]
    fn a_prompt_has_instruction_rules_examples_and_passage_in_that_order() {
        let spec = QueryTypeSpec::builtin("claim").unwrap();
        let p = passage("Octopus", "Octopuses have three hearts.");
        let seed = seed_for(&p.hash, "claim", 1);
        let messages = spec.messages(&p, seed);
        assert_eq!(messages.len(), 1);
        assert_eq!(messages[0].role, "user");
        let text = &messages[0].content;
        let drawn = spec.draw_examples(seed);
        let mut expected = format!("{}\n\n{RULES}\n\nExamples:\n\n", spec.instruction());
        for i in drawn {
            let e = &spec.examples()[i];
            expected.push_str(&format!("Passage: {}\nQuery: {}\n\n", e.passage, e.query));
        }
        expected.push_str(
            "Now write one for this passage.\n\nPassage: Octopus\nOctopuses have three hearts.",
        );
        assert_eq!(text, &expected);
        assert!(text.contains("fewer than 20 words"));
        assert!(text.contains("Do not copy long phrases"));

        let request = spec.request(&p, 1);
        assert_eq!(request.seed, seed);
        assert_eq!(request.messages, messages);
        assert_eq!(request.query_type, "claim");
        // Without the prompt: everything else the same.
        let bare = spec.request_without_prompt(&p, 1);
        assert!(bare.messages.is_empty());
        assert_eq!(
            GenerationRequest {
                messages: messages.clone(),
                ..bare
            },
            request
        );
    }

    #[test]
    fn search_is_zero_shot_and_title_hides_the_title() {
        let p = passage("Octopus", "Octopuses have three hearts.");
        let search = QueryTypeSpec::builtin("search").unwrap();
        let text = &search.messages(&p, 5)[0].content;
        assert!(!text.contains("Examples:"));
        assert!(text.contains("information seeker"));
        assert!(text.ends_with("Passage: Octopus\nOctopuses have three hearts."));
        let title = QueryTypeSpec::builtin("title").unwrap();
        let text = &title.messages(&p, 5)[0].content;
        assert!(text.ends_with("Passage: Octopuses have three hearts."));
        assert!(!text.contains("Octopus\n"));
    }

    #[test]
    fn the_prompt_hash_moves_with_instruction_pool_and_shots_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ex.jsonl");
        std::fs::write(&path, "{\"passage\": \"p one\", \"query\": \"q one\"}\n\n{\"passage\": \"p two\", \"query\": \"q two\", \"note\": 1}\n").unwrap();
        let a = QueryTypeSpec::custom("faq", "Write a FAQ entry title.", Some(&path), 2).unwrap();
        assert_eq!(a.examples().len(), 2);
        let same =
            QueryTypeSpec::custom("faq", "Write a FAQ entry title.", Some(&path), 2).unwrap();
        assert_eq!(a.prompt_hash(), same.prompt_hash());
        let other_instruction =
            QueryTypeSpec::custom("faq", "Write a FAQ question.", Some(&path), 2).unwrap();
        assert_ne!(a.prompt_hash(), other_instruction.prompt_hash());
        let fewer_shots =
            QueryTypeSpec::custom("faq", "Write a FAQ entry title.", Some(&path), 1).unwrap();
        assert_ne!(a.prompt_hash(), fewer_shots.prompt_hash());
        std::fs::write(&path, "{\"passage\": \"p one\", \"query\": \"q one!\"}\n{\"passage\": \"p two\", \"query\": \"q two\"}\n").unwrap();
        let edited_pool =
            QueryTypeSpec::custom("faq", "Write a FAQ entry title.", Some(&path), 2).unwrap();
        assert_ne!(a.prompt_hash(), edited_pool.prompt_hash());
        assert_eq!(a.prompt_hash().len(), 64);
    }

    #[test]
    fn custom_types_are_checked_as_a_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("one.jsonl");
        std::fs::write(&path, "{\"passage\": \"p\", \"query\": \"q\"}\n").unwrap();
        let err = QueryTypeSpec::custom("faq", "Write.", Some(&path), 3).unwrap_err();
        assert_eq!(
            err.to_string(),
            "query type `faq`: asks for 3 few-shot examples but its pool has 1"
        );
        assert!(QueryTypeSpec::custom("faq", "Write.", None, 1).is_err());
        assert!(QueryTypeSpec::custom("bad name", "Write.", None, 0).is_err());
        assert!(QueryTypeSpec::custom("faq", "  ", None, 0).is_err());
        let zero_shot = QueryTypeSpec::custom("faq", "Write.", None, 0).unwrap();
        let duplicate = PromptSet::new(vec![zero_shot.clone(), zero_shot]).unwrap_err();
        assert_eq!(duplicate.to_string(), "query type `faq`: is listed twice");
    }
}
