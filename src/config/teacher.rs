//! `[[teachers]]`: what the user writes ([`TeacherFile`]) and what `label` runs
//! ([`TeacherSettings`]). Which fields apply depends on the kind; a field that does not
//! apply, a missing model or an unknown kind is an error naming `teachers[i]` and the
//! field.

use serde::{Deserialize, Serialize};

use crate::mining::bm25::{Bm25Params, DEFAULT_B, DEFAULT_K1};

/// A teacher, as written: what scores the (query, candidate) pairs, and its weight when
/// several are combined. Which fields apply depends on `kind`; [`super::Pipeline::resolve`]
/// turns it into a [`TeacherSettings`] and names any field that does not apply.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherFile {
    /// `cross-encoder` (the default), `bi-encoder` or `bm25`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The model directory or hub id (cross-encoder, bi-encoder); absent for bm25.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default = "default_weight")]
    pub weight: f32,
    /// Maximum tokens per (query, passage) pair for a cross-encoder (the recipe's 512 by
    /// default); per text for a bi-encoder (the model's `max_seq_length` by default).
    #[serde(default)]
    pub max_length: Option<usize>,
    /// bi-encoder: overrides the model's query prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_prefix: Option<String>,
    /// bi-encoder: overrides the model's passage prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passage_prefix: Option<String>,
    /// bm25: term-frequency saturation (default [`crate::mining::bm25::DEFAULT_K1`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k1: Option<f64>,
    /// bm25: length normalisation (default [`crate::mining::bm25::DEFAULT_B`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub b: Option<f64>,
}

/// A teacher, checked and resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct TeacherSettings {
    /// Its weight when several teachers' calibrated scores are combined.
    pub weight: f32,
    pub kind: TeacherKind,
}

/// What scores a pair.
#[derive(Debug, Clone, PartialEq)]
pub enum TeacherKind {
    /// A sequence-classification model reading query and passage together.
    CrossEncoder {
        model: String,
        max_length: Option<usize>,
    },
    /// A sentence embedder: the cosine of the query's and the passage's embeddings.
    BiEncoder {
        model: String,
        max_seq_length: Option<usize>,
        query_prefix: Option<String>,
        passage_prefix: Option<String>,
    },
    /// Okapi BM25 against the pipeline's corpus statistics.
    Bm25(Bm25Params),
}

impl TeacherKind {
    pub const CROSS_ENCODER: &'static str = "cross-encoder";
    pub const BI_ENCODER: &'static str = "bi-encoder";
    pub const BM25: &'static str = "bm25";

    /// The name written in `kind`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::CrossEncoder { .. } => Self::CROSS_ENCODER,
            Self::BiEncoder { .. } => Self::BI_ENCODER,
            Self::Bm25(_) => Self::BM25,
        }
    }
}

impl TeacherFile {
    /// Checks the fields that apply to this teacher's kind and resolves it;
    /// `resolve_model` turns a written model into a path or hub id. Errors name
    /// `teachers[i]` and the field.
    pub(super) fn resolve(
        &self,
        i: usize,
        resolve_model: impl Fn(&str) -> String,
    ) -> Result<TeacherSettings, String> {
        let field = |name: &str| format!("teachers[{i}].{name}");
        let kind = self.kind.as_deref().unwrap_or(TeacherKind::CROSS_ENCODER);
        if !(self.weight.is_finite() && self.weight >= 0.0) {
            return Err(format!(
                "{} must be finite and >= 0, found {}",
                field("weight"),
                self.weight
            ));
        }
        let not_for = |name: &str, set: bool, applies_to: &str| {
            if set {
                Err(format!(
                    "{} does not apply to a {kind} teacher (only to {applies_to}); remove it",
                    field(name)
                ))
            } else {
                Ok(())
            }
        };
        let model = || {
            self.model.as_deref().map(&resolve_model).ok_or_else(|| {
                format!(
                    "{} is missing: a {kind} teacher needs a model directory or hub id",
                    field("model")
                )
            })
        };
        let kind = match kind {
            TeacherKind::CROSS_ENCODER | TeacherKind::BI_ENCODER => {
                not_for("k1", self.k1.is_some(), "bm25")?;
                not_for("b", self.b.is_some(), "bm25")?;
                if kind == TeacherKind::CROSS_ENCODER {
                    not_for("query_prefix", self.query_prefix.is_some(), "bi-encoder")?;
                    not_for(
                        "passage_prefix",
                        self.passage_prefix.is_some(),
                        "bi-encoder",
                    )?;
                    TeacherKind::CrossEncoder {
                        model: model()?,
                        max_length: self.max_length,
                    }
                } else {
                    TeacherKind::BiEncoder {
                        model: model()?,
                        max_seq_length: self.max_length,
                        query_prefix: self.query_prefix.clone(),
                        passage_prefix: self.passage_prefix.clone(),
                    }
                }
            }
            TeacherKind::BM25 => {
                if self.model.is_some() {
                    return Err(format!(
                        "{} must be absent: a bm25 teacher uses no model, only the words of \
                         the query, the passage and the corpus",
                        field("model")
                    ));
                }
                not_for("max_length", self.max_length.is_some(), "model teachers")?;
                not_for("query_prefix", self.query_prefix.is_some(), "bi-encoder")?;
                not_for(
                    "passage_prefix",
                    self.passage_prefix.is_some(),
                    "bi-encoder",
                )?;
                let params = Bm25Params {
                    k1: self.k1.unwrap_or(DEFAULT_K1),
                    b: self.b.unwrap_or(DEFAULT_B),
                };
                params
                    .validate()
                    .map_err(|e| format!("teachers[{i}].{e}"))?;
                TeacherKind::Bm25(params)
            }
            other => {
                return Err(format!(
                    "{}: unknown kind `{other}`; expected `{}`, `{}` or `{}`",
                    field("kind"),
                    TeacherKind::CROSS_ENCODER,
                    TeacherKind::BI_ENCODER,
                    TeacherKind::BM25
                ))
            }
        };
        Ok(TeacherSettings {
            weight: self.weight,
            kind,
        })
    }
}

fn default_weight() -> f32 {
    1.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{parse, MINIMAL};

    #[test]
    fn teacher_kinds_resolve_with_their_defaults() {
        let p = parse(&format!(
            "{MINIMAL}\n[[teachers]]\nmodel = \"ce\"\n\
             [[teachers]]\nkind = \"bi-encoder\"\nmodel = \"/abs/mini\"\nweight = 2\n\
             query_prefix = \"q: \"\nmax_length = 64\n\
             [[teachers]]\nkind = \"bm25\"\n\
             [[teachers]]\nkind = \"bm25\"\nk1 = 1.2\nb = 0.75\n"
        ))
        .unwrap();
        assert_eq!(
            p.teachers[0].kind,
            TeacherKind::CrossEncoder {
                model: "ce".into(),
                max_length: None
            }
        );
        assert_eq!(
            p.teachers[1],
            TeacherSettings {
                weight: 2.0,
                kind: TeacherKind::BiEncoder {
                    model: "/abs/mini".into(),
                    max_seq_length: Some(64),
                    query_prefix: Some("q: ".into()),
                    passage_prefix: None,
                },
            }
        );
        // Anserini's defaults.
        assert_eq!(
            p.teachers[2].kind,
            TeacherKind::Bm25(Bm25Params { k1: 0.9, b: 0.4 })
        );
        assert_eq!(
            p.teachers[3].kind,
            TeacherKind::Bm25(Bm25Params { k1: 1.2, b: 0.75 })
        );
    }

    #[test]
    fn teacher_fields_that_do_not_fit_the_kind_are_named() {
        let err = |teachers: &str| {
            parse(&format!(
                "{MINIMAL}\n[[teachers]]\nmodel = \"ce\"\n{teachers}"
            ))
            .unwrap_err()
            .to_string()
        };
        let e = err("[[teachers]]\nkind = \"bm25\"\nmodel = \"m\"\n");
        assert!(e.contains("teachers[1].model must be absent"), "{e}");
        let e = err("[[teachers]]\nkind = \"bi-encoder\"\n");
        assert!(e.contains("teachers[1].model is missing"), "{e}");
        let e = err("[[teachers]]\nweight = 1\n");
        assert!(
            e.contains("teachers[1].model is missing: a cross-encoder"),
            "{e}"
        );
        let e = err("[[teachers]]\nkind = \"splade\"\nmodel = \"m\"\n");
        assert!(e.contains("teachers[1].kind: unknown kind `splade`"), "{e}");
        assert!(e.contains("`bi-encoder`"), "{e}");
        let e = err("[[teachers]]\nkind = \"bm25\"\nb = 2\n");
        assert!(
            e.contains("teachers[1].b must be in [0, 1], found 2"),
            "{e}"
        );
        let e = err("[[teachers]]\nkind = \"bm25\"\nk1 = -0.5\n");
        assert!(e.contains("teachers[1].k1 must be finite"), "{e}");
        let e = err("[[teachers]]\nmodel = \"m\"\nk1 = 1.0\n");
        assert!(
            e.contains("teachers[1].k1 does not apply to a cross-encoder"),
            "{e}"
        );
        let e = err("[[teachers]]\nmodel = \"m\"\nquery_prefix = \"q\"\n");
        assert!(e.contains("teachers[1].query_prefix does not apply"), "{e}");
        let e = err("[[teachers]]\nkind = \"bm25\"\nmax_length = 5\n");
        assert!(
            e.contains("teachers[1].max_length does not apply to a bm25"),
            "{e}"
        );
    }
}
