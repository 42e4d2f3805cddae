//! The training losses: small batches whose values follow by hand, and the PyTorch
//! reference (tests/reference/loss_reference.py -> tests/fixtures/loss_reference.json) for
//! the three modes' values and gradients.
#![allow(clippy::unwrap_used)]

use candle_core::{DType, Device, Tensor, Var};
use distillery::train::loss::{distillation_loss, LossConfig, LossMode, TeacherLists};
use serde::Deserialize;

fn config(mode: LossMode) -> LossConfig {
    LossConfig {
        mode,
        ..LossConfig::default()
    }
}

/// A 2-d unit vector with the given first coordinate: its cosine with `[1, 0]`.
fn unit(cos: f64) -> [f64; 2] {
    [cos, (1.0 - cos * cos).sqrt()]
}

fn tensor(values: &[[f64; 2]], shape: &[usize]) -> Tensor {
    let flat: Vec<f64> = values.iter().flatten().copied().collect();
    Tensor::from_vec(flat, shape, &Device::Cpu).unwrap()
}

fn lists(list_len: usize, entries: &[(&[u32], &[f32])]) -> TeacherLists {
    let mut lists = TeacherLists::new(list_len);
    for (ids, scores) in entries {
        lists.push(ids, scores).unwrap();
    }
    lists
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

#[test]
fn kl_of_identical_distributions_is_zero() {
    // cos / 0.05 = [20, 19, 18] and t / 0.3 = [10, 7, 4] / 3 differ by the same shift.
    let q = tensor(&[[1.0, 0.0]], &[1, 2]);
    let p = tensor(&[unit(1.0), unit(0.95), unit(0.9)], &[1, 3, 2]);
    let lists = lists(3, &[(&[1, 2, 3], &[1.0, 0.7, 0.4])]);
    let terms = distillation_loss(&config(LossMode::Listwise), &q, &p, &lists).unwrap();
    assert!(
        scalar(&terms.total).abs() < 1e-9,
        "{}",
        scalar(&terms.total)
    );
    assert!(terms.infonce.is_none());
}

#[test]
fn kl_of_two_entries_by_hand() {
    // Student logits [20, 0]; teacher logits [1 / 0.3, 0], so P1 = 1 / (1 + e^(10/3)) and
    // KL = P0 ln P0 + P1 ln P1 + ln(1 + e^-20) + 20 P1 = 0.539034...
    let q = tensor(&[[1.0, 0.0]], &[1, 2]);
    let p = tensor(&[[1.0, 0.0], [0.0, 1.0]], &[1, 2, 2]);
    let lists = lists(2, &[(&[1, 2], &[1.0, 0.0])]);
    let terms = distillation_loss(&config(LossMode::Listwise), &q, &p, &lists).unwrap();
    assert!((scalar(&terms.total) - 0.5390341804185433).abs() < 1e-12);
    // The same list padded to length 4 (padding zeros) gives the same value.
    let padded = tensor(
        &[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]],
        &[1, 4, 2],
    );
    let lists = self::lists(4, &[(&[1, 2], &[1.0, 0.0])]);
    let terms = distillation_loss(&config(LossMode::Listwise), &q, &padded, &lists).unwrap();
    assert!((scalar(&terms.total) - 0.5390341804185433).abs() < 1e-12);
}

#[test]
fn infonce_of_one_query_by_hand() {
    // Logits cos / 0.01 = [50, 48]: CE = ln(e^50 + e^48) - 50 = ln(1 + e^-2).
    let q = tensor(&[[1.0, 0.0]], &[1, 2]);
    let p = tensor(&[unit(0.5), unit(0.48)], &[1, 2, 2]);
    let lists = lists(2, &[(&[1, 2], &[1.0, 0.5])]);
    let only = distillation_loss(&config(LossMode::Infonce), &q, &p, &lists).unwrap();
    assert!((scalar(&only.total) - 0.1269280110429725).abs() < 1e-12);
    assert!(only.kl.is_none());
    // The recipe's total is KL + 0.1 x InfoNCE.
    let both = distillation_loss(&LossConfig::default(), &q, &p, &lists).unwrap();
    let (kl, nce) = (
        scalar(both.kl.as_ref().unwrap()),
        scalar(both.infonce.as_ref().unwrap()),
    );
    assert!((nce - 0.1269280110429725).abs() < 1e-12);
    assert!((scalar(&both.total) - (kl + 0.1 * nce)).abs() < 1e-12);
}

#[test]
fn large_logits_are_stable_in_f32() {
    // Logits cos / 0.01 = [100, 98]: e^100 overflows f32, the shifted sum does not.
    // CE = ln(1 + e^-2).
    let q = tensor(&[[1.0, 0.0]], &[1, 2]).to_dtype(DType::F32).unwrap();
    let p = tensor(&[unit(1.0), unit(0.98)], &[1, 2, 2])
        .to_dtype(DType::F32)
        .unwrap();
    let lists = lists(2, &[(&[1, 2], &[1.0, 0.5])]);
    let terms = distillation_loss(&config(LossMode::Infonce), &q, &p, &lists).unwrap();
    assert!((scalar(&terms.total) - 0.1269280110429725).abs() < 1e-5);
}

#[test]
fn false_negative_is_masked() {
    // Entry 1 scores 0.7 > 0.6 x 1.0: dropped, so CE = ln(e^50 + e^48) - 50 whatever its
    // cosine, and it receives no gradient.
    let q = tensor(&[[1.0, 0.0]], &[1, 2]);
    let masked = lists(3, &[(&[1, 2, 3], &[1.0, 0.7, 0.2])]);
    for cos in [0.9, 0.1] {
        let p = Var::from_tensor(&tensor(&[unit(0.5), unit(cos), unit(0.48)], &[1, 3, 2])).unwrap();
        let terms = distillation_loss(&config(LossMode::Infonce), &q, &p, &masked).unwrap();
        assert!((scalar(&terms.total) - 0.1269280110429725).abs() < 1e-12);
        let grads = terms.total.backward().unwrap();
        let grad = grads.get(&p).unwrap().get(0).unwrap().get(1).unwrap();
        assert_eq!(grad.to_vec1::<f64>().unwrap(), vec![0.0, 0.0]);
    }
    // At 0.5 it is an ordinary negative: ln(e^50 + e^90 + e^48) - 50 = 40.0 (to 1e-15).
    let kept = lists(3, &[(&[1, 2, 3], &[1.0, 0.5, 0.2])]);
    let p = tensor(&[unit(0.5), unit(0.9), unit(0.48)], &[1, 3, 2]);
    let terms = distillation_loss(&config(LossMode::Infonce), &q, &p, &kept).unwrap();
    assert!((scalar(&terms.total) - 40.0).abs() < 1e-9);
}

#[test]
fn copy_of_positive_is_masked_and_passages_count_once() {
    // Flat entries: 0 = A, 1 = C, 2 = C (query 1's positive), 3 = D; cosines with both
    // queries 0.5, 0.48, 0.48, 0.46, logits 50, 48, 48, 46. Query 0 sees A, C once, D:
    // ln(1 + e^-2 + e^-4). Query 1 sees its own C, A, D but not the earlier copy of C:
    // ln(1 + e^-2 + e^-4) + 2. Mean: ln(1 + e^-2 + e^-4) + 1 = 1.14293...
    let q = tensor(&[[1.0, 0.0], [1.0, 0.0]], &[2, 2]);
    let p = tensor(&[unit(0.5), unit(0.48), unit(0.48), unit(0.46)], &[2, 2, 2]);
    let lists = lists(2, &[(&[1, 3], &[1.0, 0.2]), (&[3, 4], &[1.0, 0.2])]);
    let terms = distillation_loss(&config(LossMode::Infonce), &q, &p, &lists).unwrap();
    assert!((scalar(&terms.total) - 1.1429316284998996).abs() < 1e-12);
}

#[test]
fn non_finite_embeddings_are_not_hidden() {
    let lists = lists(3, &[(&[1, 2], &[1.0, 0.5])]);
    let q = tensor(&[[1.0, 0.0]], &[1, 2]);
    // A NaN in the padding slot.
    let p = tensor(&[unit(0.5), unit(0.48), [f64::NAN, 0.0]], &[1, 3, 2]);
    for mode in [
        LossMode::ListwiseInfonce,
        LossMode::Listwise,
        LossMode::Infonce,
    ] {
        let terms = distillation_loss(&config(mode), &q, &p, &lists).unwrap();
        assert!(scalar(&terms.total).is_nan(), "{mode:?}");
    }
    // An infinity in the query.
    let q = tensor(&[[f64::INFINITY, 0.0]], &[1, 2]);
    let p = tensor(&[unit(0.5), unit(0.48), [0.0, 0.0]], &[1, 3, 2]);
    for mode in [
        LossMode::ListwiseInfonce,
        LossMode::Listwise,
        LossMode::Infonce,
    ] {
        let terms = distillation_loss(&config(mode), &q, &p, &lists).unwrap();
        assert!(!scalar(&terms.total).is_finite(), "{mode:?}");
    }
}

#[test]
fn shapes_and_dtypes_are_checked() {
    let lists = lists(2, &[(&[1, 2], &[1.0, 0.5])]);
    let q = tensor(&[[1.0, 0.0]], &[1, 2]);
    let p = tensor(&[unit(0.5), unit(0.48)], &[1, 2, 2]);
    let wrong_len = tensor(&[unit(0.5), unit(0.48)], &[2, 1, 2]);
    let cfg = LossConfig::default();
    assert!(distillation_loss(&cfg, &q, &wrong_len, &lists).is_err());
    assert!(distillation_loss(&cfg, &q.to_dtype(DType::F32).unwrap(), &p, &lists).is_err());
    let half = (
        q.to_dtype(DType::F16).unwrap(),
        p.to_dtype(DType::F16).unwrap(),
    );
    assert!(distillation_loss(&cfg, &half.0, &half.1, &lists).is_err());
    assert!(distillation_loss(&cfg, &q, &p, &TeacherLists::new(2)).is_err());
}

/// tests/fixtures/loss_reference.json.
#[derive(Deserialize)]
struct Fixture {
    list_len: usize,
    passage_ids: Vec<Vec<u32>>,
    scores: Vec<Vec<f32>>,
    queries: Vec<Vec<f64>>,
    passages: Vec<Vec<Vec<f64>>>,
    modes: std::collections::BTreeMap<String, Expected>,
}

#[derive(Deserialize)]
struct Expected {
    total: f64,
    kl: Option<f64>,
    infonce: Option<f64>,
    grad_queries: Vec<Vec<f64>>,
    grad_passages: Vec<Vec<Vec<f64>>>,
}

fn assert_close(what: &str, got: &[f64], expected: &[f64], rel: f64, abs: f64) {
    assert_eq!(got.len(), expected.len(), "{what}");
    for (k, (&g, &e)) in got.iter().zip(expected).enumerate() {
        let tolerance = (rel * e.abs()).max(abs);
        assert!(
            (g - e).abs() <= tolerance,
            "{what}[{k}]: {g} vs reference {e}"
        );
    }
}

fn check_against_reference(dtype: DType, rel: f64, abs: f64) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/loss_reference.json"
    );
    let fixture: Fixture = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut lists = TeacherLists::new(fixture.list_len);
    for (ids, scores) in fixture.passage_ids.iter().zip(&fixture.scores) {
        lists.push(ids, scores).unwrap();
    }
    let n = fixture.queries.len();
    let d = fixture.queries[0].len();
    let q_flat: Vec<f64> = fixture.queries.concat();
    let p_flat: Vec<f64> = fixture.passages.concat().concat();
    let modes = [
        ("listwise_infonce", LossMode::ListwiseInfonce),
        ("listwise", LossMode::Listwise),
        ("infonce", LossMode::Infonce),
    ];
    for (name, mode) in modes {
        let expected = &fixture.modes[name];
        let q = Var::from_tensor(
            &Tensor::from_vec(q_flat.clone(), (n, d), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap();
        let p = Var::from_tensor(
            &Tensor::from_vec(p_flat.clone(), (n, fixture.list_len, d), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap();
        let terms = distillation_loss(&config(mode), &q, &p, &lists).unwrap();
        assert_close(name, &[scalar(&terms.total)], &[expected.total], rel, abs);
        assert_eq!(terms.kl.is_some(), expected.kl.is_some(), "{name}");
        assert_eq!(
            terms.infonce.is_some(),
            expected.infonce.is_some(),
            "{name}"
        );
        if let (Some(got), Some(e)) = (&terms.kl, expected.kl) {
            assert_close("kl", &[scalar(got)], &[e], rel, abs);
        }
        if let (Some(got), Some(e)) = (&terms.infonce, expected.infonce) {
            assert_close("infonce", &[scalar(got)], &[e], rel, abs);
        }
        let grads = terms.total.backward().unwrap();
        let flat = |t: &Tensor| -> Vec<f64> {
            t.flatten_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let grad_q = flat(grads.get(&q).unwrap());
        let grad_p = flat(grads.get(&p).unwrap());
        let what = format!("{name} d/dqueries ({dtype:?})");
        assert_close(&what, &grad_q, &expected.grad_queries.concat(), rel, abs);
        let what = format!("{name} d/dpassages ({dtype:?})");
        let expected_p = expected.grad_passages.concat().concat();
        assert_close(&what, &grad_p, &expected_p, rel, abs);
    }
}

/// In f64 the two computations agree to rounding, far inside the 1e-5 asked of them.
#[test]
fn matches_pytorch_in_f64() {
    check_against_reference(DType::F64, 1e-9, 1e-10);
}

/// In f32 a cosine is rounded at about 6e-8, and 1 / temperature (up to 100) magnifies that
/// in the logits and gradients: 1e-4 relative.
#[test]
fn matches_pytorch_in_f32() {
    check_against_reference(DType::F32, 1e-4, 1e-5);
}
