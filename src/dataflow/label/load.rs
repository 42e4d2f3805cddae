//! Building a teacher from its `[[teachers]]` entry: the one place that knows every
//! kind, so the kinds and the trait they implement (`teacher.rs`) need not know each
//! other.

use std::path::PathBuf;

use crate::config::{Pipeline, TeacherKind, TeacherSettings};
use crate::error::EngineError;

use super::bi_encoder::BiEncoderTeacher;
use super::bm25::Bm25Teacher;
use super::cross_encoder::CrossEncoderTeacher;
use super::teacher::PairTeacher;

/// Loads every teacher of `[[teachers]]`, in order.
pub fn load_teachers(pipeline: &Pipeline) -> Result<Vec<Box<dyn PairTeacher>>, EngineError> {
    pipeline
        .teachers
        .iter()
        .enumerate()
        .map(|(t, settings)| load_teacher(pipeline, t, settings))
        .collect()
}

/// Loads the teacher `settings` describes; `index` is its place in `[[teachers]]`.
pub fn load_teacher(
    pipeline: &Pipeline,
    index: usize,
    settings: &TeacherSettings,
) -> Result<Box<dyn PairTeacher>, EngineError> {
    Ok(match &settings.kind {
        TeacherKind::CrossEncoder { model, max_length } => Box::new(CrossEncoderTeacher::load(
            &PathBuf::from(model),
            *max_length,
            &pipeline.device,
        )?),
        TeacherKind::BiEncoder {
            model,
            max_seq_length,
            query_prefix,
            passage_prefix,
        } => {
            let embed = crate::config::EmbedSettings {
                model: Some(model.clone()),
                max_seq_length: *max_seq_length,
                query_prefix: query_prefix.clone(),
                passage_prefix: passage_prefix.clone(),
                ..pipeline.retrievers[0].clone()
            };
            Box::new(BiEncoderTeacher::load(
                &embed,
                &pipeline.corpus,
                &pipeline.run_dir.join(format!("teacher{index}-tiny-model")),
            )?)
        }
        TeacherKind::Bm25(params) => Box::new(Bm25Teacher::new(
            *params,
            &pipeline.corpus,
            pipeline.quarantine.as_deref(),
        )?),
    })
}
