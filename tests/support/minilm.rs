//! Finding all-MiniLM-L6-v2 for the reference tests, shared by the tests of both crates
//! (`#[path]`-included). The model is found through `DISTILLERY_MINILM_DIR`, else
//! `shared/models/all-MiniLM-L6-v2` beside the checkout.
//!
//! Without it a test prints `SKIPPED: <reason>` and passes, except under CI
//! (`CI=true`), where it fails: these tests are the only evidence that the embeddings
//! equal sentence-transformers', and CI fetches the model (`tools/fetch-minilm.sh`), so a
//! missing model there is a broken CI, not a reason to skip.

use std::path::PathBuf;

/// The model directory, or `None` (said as SKIPPED) outside CI; panics under CI.
pub fn minilm_dir() -> Option<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let candidates = [
        std::env::var_os("DISTILLERY_MINILM_DIR").map(PathBuf::from),
        // The root crate's manifest is the checkout; the operators crate's is one below.
        Some(manifest.join("../shared/models/all-MiniLM-L6-v2")),
        Some(manifest.join("../../shared/models/all-MiniLM-L6-v2")),
    ];
    let found = candidates
        .into_iter()
        .flatten()
        .find(|d| d.join("model.safetensors").is_file());
    if found.is_none() {
        let why = "all-MiniLM-L6-v2 not found (set DISTILLERY_MINILM_DIR, or run \
                   tools/fetch-minilm.sh)";
        if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
            panic!("{why}; under CI this test must run, not skip");
        }
        eprintln!("SKIPPED: {why}");
    }
    found
}
