//! The trainer on a tiny random student and hand-made examples from the shipped SciFact
//! subset: gradient caching gives the full-batch gradient, a run stopped mid-epoch and
//! resumed ends with bit-identical weights, the exported model loads as an embedder
//! that gives the student's embeddings, and early stopping ends a run whose dev loss
//! stops improving with the best epoch's weights exported.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use distillery::collective::ThreadProcess;
use distillery::corpus::ReadOptions;
use distillery::dataflow::passage_texts;
use distillery::mining::{Example, Split};
use distillery::train::data_parallel::{serve_steps, share, Peers};
use distillery::train::gradcache::{
    batch_gradients, batch_gradients_on, batch_gradients_shared, batch_loss, prepare,
    FixedPassages, PassageInputs,
};
use distillery::train::loss::{distillation_loss, LossConfig, TeacherLists};
use distillery::train::optim::grads_of;
use distillery::train::trainer::{train, RunControl, StopReason, TrainSettings};
use distillery_operators::student::{Student, StudentOptions};
use distillery_operators::tiny::{write_tiny_bert, TinyBertSpec};
use distillery_operators::{Embedder, EmbedderOptions, TextKind, TokenBatch, TokenizedText};

const LIST: usize = 5;

fn corpus() -> Vec<(String, String)> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("datasets/scifact-mini/corpus.jsonl");
    passage_texts(&path, &ReadOptions::default())
        .unwrap()
        .map(|r| r.unwrap())
        .collect()
}

/// Query i: the first six words of passage 3i; its list: that passage then four others,
/// scores falling from 1.
fn examples(passages: &[(String, String)], n: usize) -> Vec<Example> {
    (0..n)
        .map(|i| {
            let src = 3 * i;
            let query: String = passages[src]
                .1
                .split_whitespace()
                .take(6)
                .collect::<Vec<_>>()
                .join(" ");
            let ids: Vec<String> = (0..LIST)
                .map(|j| passages[(src + 7 * j) % passages.len()].0.clone())
                .collect();
            Example {
                query_id: format!("q{i:03}"),
                query_text: query,
                query_type: "title".into(),
                source_ids: vec![ids[0].clone()],
                passage_ids: ids,
                scores: vec![1.0, 0.7, 0.5, 0.2, 0.0],
                split: if i % 5 == 4 { Split::Dev } else { Split::Train },
            }
        })
        .collect()
}

fn tiny_student(dir: &Path, passages: &[(String, String)]) -> Student {
    if !dir.join("model.safetensors").exists() {
        write_tiny_bert(
            dir,
            passages.iter().map(|p| p.1.as_str()),
            &TinyBertSpec::default(),
        )
        .unwrap();
    }
    let opts = StudentOptions {
        query_max_length: 16,
        passage_max_length: 48,
        ..StudentOptions::default()
    };
    Student::load(dir, &opts, &Device::Cpu).unwrap()
}

fn quiet(stop_after: Option<u64>) -> RunControl<'static> {
    RunControl {
        stop_after,
        quiet: true,
        device: None,
        inputs: "the examples of `examples`".into(),
        peers: None,
    }
}

/// Each passage id of `ex` numbered in order of first appearance, as the trainer does.
fn intern(ex: &[Example]) -> HashMap<String, u32> {
    let mut intern = HashMap::new();
    for e in ex {
        for p in &e.passage_ids {
            let n = intern.len() as u32;
            intern.entry(p.clone()).or_insert(n);
        }
    }
    intern
}

fn settings() -> TrainSettings {
    TrainSettings {
        micro_batch: 2,
        accumulation: 2,
        max_epochs: 2,
        patience: 5,
        list_len: LIST,
        ..TrainSettings::default()
    }
}

#[test]
fn gradient_caching_equals_one_full_batch_backward() {
    let passages = corpus();
    let texts: HashMap<String, String> = passages.iter().cloned().collect();
    let model = tempfile::tempdir().unwrap();
    let student = tiny_student(model.path(), &passages);
    let ex = examples(&passages, 6);
    let refs: Vec<&Example> = ex.iter().collect();
    let intern = intern(&ex);
    let loss = LossConfig::default();
    let vars = student.vars();
    let batch = prepare(&student, &refs, (&texts).into(), &intern, LIST).unwrap();
    // Micro-batches of 2 queries: three re-embedding passes.
    let (cached, values) = batch_gradients(&student, &loss, &batch, 2).unwrap();

    // The reference: everything embedded with the graph, one backward.
    let q_texts: Vec<&str> = ex.iter().map(|e| e.query_text.as_str()).collect();
    let q_ids = student.tokenize(&q_texts, TextKind::Query).unwrap();
    let q = student
        .embed(&TokenBatch {
            rows: q_ids
                .into_iter()
                .enumerate()
                .map(|(i, ids)| TokenizedText::new(i, ids))
                .collect(),
        })
        .unwrap();
    let p_texts: Vec<&str> = ex
        .iter()
        .flat_map(|e| e.passage_ids.iter().map(|p| texts[p].as_str()))
        .collect();
    let p_ids = student.tokenize(&p_texts, TextKind::Passage).unwrap();
    let p = student
        .embed(&TokenBatch {
            rows: p_ids
                .into_iter()
                .enumerate()
                .map(|(i, ids)| TokenizedText::new(i, ids))
                .collect(),
        })
        .unwrap()
        .reshape((ex.len(), LIST, student.dim()))
        .unwrap();
    let mut lists = TeacherLists::new(LIST);
    for e in &ex {
        let ids: Vec<u32> = e.passage_ids.iter().map(|p| intern[p]).collect();
        lists.push(&ids, &e.scores).unwrap();
    }
    let terms = distillation_loss(&loss, &q, &p, &lists).unwrap();
    let full_loss = terms.total.to_scalar::<f32>().unwrap() as f64;
    assert!(
        (full_loss - values.total).abs() < 1e-5 * full_loss.abs().max(1.0),
        "full {full_loss} cached {values:?}"
    );
    let full = grads_of(&terms.total.backward().unwrap(), &vars);
    let mut compared = 0;
    for (i, (a, b)) in cached.iter().zip(&full).enumerate() {
        let (Some(a), Some(b)) = (a, b) else {
            assert!(
                a.is_none() && b.is_none(),
                "var {i}: gradient in one path only"
            );
            continue;
        };
        let diff = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let scale = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .max(1e-6);
        assert!(
            diff <= 1e-4 * scale + 1e-7,
            "var {i}: max diff {diff}, scale {scale}"
        );
        compared += 1;
    }
    // Every variable but the (unused) pooler gets a gradient.
    assert!(compared >= vars.len() - 2, "{compared} of {}", vars.len());
}

fn weights(student: &Student) -> Vec<(String, Vec<f32>)> {
    student
        .named_vars()
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            )
        })
        .collect()
}

#[test]
fn a_stopped_run_resumes_to_bit_identical_weights_and_exports_a_loadable_model() {
    let passages = corpus();
    let texts: HashMap<String, String> = passages.iter().cloned().collect();
    let ex = examples(&passages, 20);
    let model = tempfile::tempdir().unwrap();
    let _ = tiny_student(model.path(), &passages);

    // Uninterrupted: 16 train queries / 4 per step = 4 steps an epoch, 2 epochs.
    let whole = tempfile::tempdir().unwrap();
    let a = tiny_student(model.path(), &passages);
    let report = train(
        &a,
        ex.clone(),
        &texts,
        &settings(),
        whole.path(),
        (None, None),
        quiet(None),
    )
    .unwrap();
    assert_eq!(report.steps_per_epoch, 4);
    assert_eq!(report.state.global_step, 8);
    assert_eq!(report.dev_losses.len(), 2);

    // Stopped after 5 steps (mid second epoch), then resumed by a fresh process-like start.
    let broken = tempfile::tempdir().unwrap();
    let b = tiny_student(model.path(), &passages);
    let stopped = train(
        &b,
        ex.clone(),
        &texts,
        &settings(),
        broken.path(),
        (None, None),
        quiet(Some(5)),
    )
    .unwrap();
    assert_eq!(stopped.state.global_step, 5);
    drop(b);
    let c = tiny_student(model.path(), &passages);
    let resumed = train(
        &c,
        ex.clone(),
        &texts,
        &settings(),
        broken.path(),
        (None, None),
        quiet(None),
    )
    .unwrap();
    assert_eq!(resumed.resumed_from, Some(5));
    assert_eq!(resumed.state.global_step, 8);
    // The resumed run reports the dev loss of the epoch the stopped run finished too.
    assert_eq!(resumed.dev_losses, report.dev_losses);
    assert_eq!(
        weights(&a),
        weights(&c),
        "resumed weights differ from the uninterrupted run"
    );

    // A checkpoint saved for other inputs (the examples or texts changed since) is not
    // resumed: the run starts from the student it is given and ends as a fresh run.
    let other = tempfile::tempdir().unwrap();
    let d = tiny_student(model.path(), &passages);
    let other_inputs = RunControl {
        inputs: "other examples".into(),
        ..quiet(Some(5))
    };
    train(
        &d,
        ex.clone(),
        &texts,
        &settings(),
        other.path(),
        (None, None),
        other_inputs,
    )
    .unwrap();
    drop(d);
    let e = tiny_student(model.path(), &passages);
    let restarted = train(
        &e,
        ex.clone(),
        &texts,
        &settings(),
        other.path(),
        (None, None),
        quiet(None),
    )
    .unwrap();
    assert_eq!(restarted.resumed_from, None);
    assert_eq!(restarted.state.global_step, 8);
    assert_eq!(restarted.dev_losses, report.dev_losses);
    assert_eq!(weights(&a), weights(&e));
    assert_eq!(
        std::fs::read(whole.path().join("loss-log.csv")).unwrap(),
        std::fs::read(other.path().join("loss-log.csv")).unwrap()
    );

    // Training changed the weights, and the log has one row per step.
    let fresh = tiny_student(model.path(), &passages);
    assert_ne!(weights(&fresh), weights(&a));
    let log = std::fs::read_to_string(whole.path().join("loss-log.csv")).unwrap();
    assert_eq!(log.lines().count(), 1 + 8);
    let resumed_log = std::fs::read_to_string(broken.path().join("loss-log.csv")).unwrap();
    assert_eq!(resumed_log, log);
    // The run report's plot of that log.
    let svg = std::fs::read_to_string(whole.path().join("loss.svg")).unwrap();
    assert_eq!(svg.matches("<polyline").count(), 2);

    // The best model loads as an inference embedder and embeds like a student with its
    // weights.
    let best = &report.best_model;
    let e = Embedder::load(best, &EmbedderOptions::default(), &Device::Cpu).unwrap();
    let loaded = Student::load(best, &StudentOptions::default(), &Device::Cpu).unwrap();
    let text = ["Microstructural development of human newborn cerebral white matter"];
    let ids = e.tokenize(&text, TextKind::Passage).unwrap();
    let batch = TokenBatch {
        rows: vec![TokenizedText::new(0, ids[0].clone())],
    };
    let v1 = Tensor::from_vec(e.embed_batch(&batch).unwrap(), (1, e.dim()), &Device::Cpu).unwrap();
    let v2 = loaded.embed_no_grad(&batch).unwrap();
    let diff = (v1 - v2)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-5, "{diff}");
}

/// Regression: the resumed log kept the row of the checkpoint's own step and logged that
/// step again (with the default settings, a kill in the first epoch duplicated row 0).
/// A kill after steps that no checkpoint holds is simulated by putting back an older
/// checkpoint over a run that went further: the log then has rows the checkpoint does
/// not, which the resumed run must replace, not repeat.
#[test]
fn a_resumed_loss_log_equals_the_uninterrupted_one_byte_for_byte() {
    let passages = corpus();
    let texts: HashMap<String, String> = passages.iter().cloned().collect();
    let ex = examples(&passages, 20);
    let model = tempfile::tempdir().unwrap();
    let _ = tiny_student(model.path(), &passages);
    let run = |dir: &Path, stop: Option<u64>| {
        let student = tiny_student(model.path(), &passages);
        train(
            &student,
            ex.clone(),
            &texts,
            &settings(),
            dir,
            (None, None),
            quiet(stop),
        )
        .unwrap()
    };
    let whole = tempfile::tempdir().unwrap();
    run(whole.path(), None);
    let log = std::fs::read_to_string(whole.path().join("loss-log.csv")).unwrap();
    assert_eq!(log.lines().count(), 1 + 8);

    for (checkpoint_at, killed_at) in [(0, 3), (5, 7)] {
        let broken = tempfile::tempdir().unwrap();
        let saved = tempfile::tempdir().unwrap();
        if checkpoint_at > 0 {
            run(broken.path(), Some(checkpoint_at));
            copy_dir(
                &broken.path().join("checkpoint"),
                &saved.path().join("checkpoint"),
            );
        }
        run(broken.path(), Some(killed_at));
        let before = std::fs::read_to_string(broken.path().join("loss-log.csv")).unwrap();
        assert_eq!(before.lines().count() as u64, 1 + killed_at);
        // The kill: the checkpoint on disk is the one of `checkpoint_at` (none for 0).
        std::fs::remove_dir_all(broken.path().join("checkpoint")).unwrap();
        if checkpoint_at > 0 {
            copy_dir(
                &saved.path().join("checkpoint"),
                &broken.path().join("checkpoint"),
            );
        }
        let resumed = run(broken.path(), None);
        assert_eq!(
            resumed.resumed_from,
            (checkpoint_at > 0).then_some(checkpoint_at)
        );
        let resumed_log = std::fs::read_to_string(broken.path().join("loss-log.csv")).unwrap();
        assert_eq!(
            resumed_log, log,
            "killed at {killed_at}, checkpoint {checkpoint_at}"
        );
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[test]
fn early_stopping_ends_the_run_and_the_best_model_holds_the_best_epochs_weights() {
    let passages = corpus();
    let texts: HashMap<String, String> = passages.iter().cloned().collect();
    // Sixteen training queries, and a dev set that contradicts them: four of the same
    // queries and lists in reverse order (the training list's last passage is the dev
    // list's positive, its positive the dev list's last). The better the student fits
    // the training lists, the worse its dev loss.
    let mut ex: Vec<Example> = examples(&passages, 16)
        .into_iter()
        .map(|mut e| {
            e.split = Split::Train;
            e
        })
        .collect();
    for e in ex.clone().iter().take(4) {
        let mut dev = e.clone();
        dev.query_id = format!("{}-dev", e.query_id);
        dev.passage_ids.reverse();
        dev.source_ids = vec![dev.passage_ids[0].clone()];
        dev.split = Split::Dev;
        ex.push(dev);
    }
    let model = tempfile::tempdir().unwrap();
    let _ = tiny_student(model.path(), &passages);
    let patient = |max_epochs, patience| TrainSettings {
        max_epochs,
        patience,
        ..settings()
    };

    let run = tempfile::tempdir().unwrap();
    let trained = tiny_student(model.path(), &passages);
    let report = train(
        &trained,
        ex.clone(),
        &texts,
        &patient(8, 2),
        run.path(),
        (None, None),
        quiet(None),
    )
    .unwrap();
    assert_eq!(
        report.stopped,
        StopReason::Patience,
        "{:?}",
        report.dev_losses
    );
    let best = report.best_epoch.unwrap();
    // The run ended `patience` epochs after its best, before max_epochs, and no later
    // epoch beat the best.
    assert_eq!(report.state.epoch, best + 1 + 2);
    assert!(report.state.epoch < 8);
    assert_eq!(report.dev_losses.len() as u64, report.state.epoch);
    let best_loss = report.dev_losses[best as usize];
    assert!(report.dev_losses[..best as usize]
        .iter()
        .all(|&l| l > best_loss));
    assert!(report.dev_losses[best as usize + 1..]
        .iter()
        .all(|&l| l >= best_loss));

    // The same training stopped at the best epoch exports the same bytes: the best model
    // is that epoch's weights, not the last epoch's.
    let short = tempfile::tempdir().unwrap();
    let student = tiny_student(model.path(), &passages);
    let until_best = train(
        &student,
        ex,
        &texts,
        &patient(best + 1, 100),
        short.path(),
        (None, None),
        quiet(None),
    )
    .unwrap();
    assert_eq!(until_best.stopped, StopReason::MaxEpochs);
    let bytes = |dir: &Path| std::fs::read(dir.join("model.safetensors")).unwrap();
    assert!(bytes(&report.best_model) == bytes(&until_best.best_model));
    // ...and the last epoch's weights differ from them (training went on after it).
    let last = tempfile::tempdir().unwrap();
    trained
        .export_sentence_transformers(trained.dir(), last.path(), (None, None))
        .unwrap();
    assert!(bytes(&report.best_model) != bytes(last.path()));
}

fn bits(grads: &[Option<Tensor>]) -> Vec<Option<Vec<u32>>> {
    grads
        .iter()
        .map(|g| {
            g.as_ref().map(|t| {
                let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
                v.into_iter().map(f32::to_bits).collect()
            })
        })
        .collect()
}

/// A step's gradient and a dev batch's loss with the micro-batches shared among 2, 3 and
/// 5 processes (threads here; tests/cluster.rs runs real processes) are the same bits as
/// one process's, with the student's passage encoder trained and frozen, and shares of
/// unequal size or none.
#[test]
fn a_step_shared_among_processes_gives_one_processs_bits() {
    let passages = corpus();
    let texts: HashMap<String, String> = passages.iter().cloned().collect();
    let model = tempfile::tempdir().unwrap();
    let student = tiny_student(model.path(), &passages);
    // 7 queries in micro-batches of 2: 4 micro-batches, the last of one query.
    let ex = examples(&passages, 7);
    let refs: Vec<&Example> = ex.iter().collect();
    let intern = intern(&ex);
    // Fixed passage rows: any values of the student's width.
    let ids: Vec<String> = intern.keys().cloned().collect();
    let dim = student.dim();
    let values: Vec<f32> = (0..ids.len() * dim)
        .map(|i| ((i as f32) * 0.37).sin())
        .collect();
    let fixed = FixedPassages::new(model.path().to_path_buf(), ids, dim, values).unwrap();
    let loss = LossConfig::default();
    let path = student.default_gradient_path();
    for inputs in [PassageInputs::Texts(&texts), PassageInputs::Fixed(&fixed)] {
        let batch = prepare(&student, &refs, inputs, &intern, LIST).unwrap();
        let (alone, alone_loss) = batch_gradients_on(&student, path, &loss, &batch, 2).unwrap();
        let alone_dev = batch_loss(&student, &loss, &batch, 2, None).unwrap();
        for processes in [2, 3, 5] {
            let mut cluster = ThreadProcess::cluster(processes).into_iter();
            let mut zero = cluster.next().unwrap();
            let others: Vec<_> = cluster
                .map(|mut me| {
                    let (dir, passages) = (model.path().to_path_buf(), passages.clone());
                    std::thread::spawn(move || {
                        let student = tiny_student(&dir, &passages);
                        serve_steps(&student, &mut me).unwrap()
                    })
                })
                .collect();
            let mut peers = Peers::new(&mut zero).unwrap();
            let (shared, shared_loss) =
                batch_gradients_shared(&student, path, &loss, &batch, 2, Some(&mut peers)).unwrap();
            let shared_dev = batch_loss(&student, &loss, &batch, 2, Some(&mut peers)).unwrap();
            peers.finish();
            let served: Vec<_> = others.into_iter().map(|t| t.join().unwrap()).collect();
            assert_eq!(shared_loss, alone_loss, "{processes} processes");
            assert_eq!(shared_dev, alone_dev, "{processes} processes");
            assert!(
                bits(&shared) == bits(&alone),
                "{processes} processes: other gradient bits"
            );
            // Every process embedded twice (the step and the dev batch) and
            // back-propagated its share of the 4 micro-batches (none for some of 5).
            for (p, s) in served.iter().enumerate() {
                assert_eq!(s.embedded, 2, "process {}", p + 1);
                let mine = share(4, processes, p + 1).len() as u64;
                assert_eq!(s.micro_batches, mine, "process {}", p + 1);
            }
        }
    }
}
