//! AdamW with decoupled weight decay (Loshchilov & Hutter), as `torch.optim.AdamW`
//! computes it, with its state open for checkpoints; and global gradient-norm clipping as
//! `torch.nn.utils.clip_grad_norm_`.
//!
//! candle-nn has an AdamW, but its moments are private: a run could not be checkpointed
//! and resumed to the same weights. This one keeps the first and second moments per
//! variable, in the variables' order, and can save and restore them bit for bit.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

/// AdamW's settings; the defaults are the recipe's (lr 2e-4, weight decay 0.01) and
/// PyTorch's (betas 0.9 / 0.999, eps 1e-8).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 2e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// The optimiser over a fixed, ordered list of variables.
pub struct AdamW {
    vars: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Updates of each variable (PyTorch's per-parameter `state["step"]`), for its bias
    /// corrections: a variable without a gradient at a step is not counted.
    var_steps: Vec<u64>,
    /// Steps taken.
    step: u64,
    config: AdamWConfig,
}

impl AdamW {
    pub fn new(vars: Vec<Var>, config: AdamWConfig) -> candle_core::Result<Self> {
        let m = vars
            .iter()
            .map(|v| v.zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = m.clone();
        Ok(Self {
            var_steps: vec![0; vars.len()],
            vars,
            m,
            v,
            step: 0,
            config,
        })
    }

    pub fn steps(&self) -> u64 {
        self.step
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// One update at learning rate `lr`; `grads[i]` is the gradient of the `i`-th
    /// variable. A variable without a gradient is left alone (and its moments too), as
    /// PyTorch does for parameters whose `grad` is `None`.
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> candle_core::Result<()> {
        self.step += 1;
        let c = self.config;
        for (i, var) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(i).and_then(|g| g.as_ref()) else {
                continue;
            };
            self.var_steps[i] += 1;
            let t = self.var_steps[i].min(i32::MAX as u64) as i32;
            let bias1 = 1.0 - c.beta1.powi(t);
            let bias2 = 1.0 - c.beta2.powi(t);
            // PyTorch order: decay the weight first, then the Adam update.
            let decayed = (var.as_tensor() * (1.0 - lr * c.weight_decay))?;
            let m = ((&self.m[i] * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let v = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((v.sqrt()? / bias2.sqrt())? + c.eps)?;
            let update = ((&m / denom)? * (lr / bias1))?;
            var.set(&(decayed - update)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// The moments and each variable's update count, named `m.<i>`, `v.<i>` and `t.<i>`
    /// by variable position, for a checkpoint.
    pub fn state(&self) -> candle_core::Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (i, (m, v)) in self.m.iter().zip(&self.v).enumerate() {
            out.insert(format!("m.{i}"), m.clone());
            out.insert(format!("v.{i}"), v.clone());
            let steps = i64::try_from(self.var_steps[i]).unwrap_or(i64::MAX);
            out.insert(format!("t.{i}"), Tensor::new(&[steps], m.device())?);
        }
        Ok(out)
    }

    /// Restores moments and update counts saved by [`AdamW::state`], and the step count
    /// (each variable's count too, for a state saved before they were kept: every
    /// variable had a gradient at every step then).
    pub fn restore(&mut self, state: &HashMap<String, Tensor>, step: u64) -> Result<(), String> {
        let mut var_steps = vec![step; self.vars.len()];
        for (i, slot) in var_steps.iter_mut().enumerate() {
            if let Some(t) = state.get(&format!("t.{i}")) {
                let saved = t
                    .to_vec1::<i64>()
                    .ok()
                    .and_then(|v| v.first().copied())
                    .and_then(|v| u64::try_from(v).ok())
                    .ok_or_else(|| format!("optimizer state `t.{i}` is not one step count"))?;
                *slot = saved;
            }
        }
        for i in 0..self.vars.len() {
            for (name, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let key = format!("{name}.{i}");
                let t = state
                    .get(&key)
                    .ok_or_else(|| format!("optimizer state has no `{key}`"))?;
                if t.dims() != slot.dims() {
                    return Err(format!(
                        "optimizer state `{key}` has shape {:?}, the variable {:?}",
                        t.dims(),
                        slot.dims()
                    ));
                }
                *slot = t.clone();
            }
        }
        self.step = step;
        self.var_steps = var_steps;
        Ok(())
    }
}

/// The gradients of `vars` in a [`GradStore`], in the variables' order.
pub fn grads_of(store: &GradStore, vars: &[Var]) -> Vec<Option<Tensor>> {
    vars.iter()
        .map(|v| store.get(v.as_tensor()).cloned())
        .collect()
}

/// Scales every gradient so that their global L2 norm is at most `max_norm`, as
/// `torch.nn.utils.clip_grad_norm_` does (coefficient `max_norm / (norm + 1e-6)`, capped
/// at 1). Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> candle_core::Result<f64> {
    let mut total = 0f64;
    for g in grads.iter().flatten() {
        total += g
            .sqr()?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
    }
    let norm = total.sqrt();
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut().flatten() {
            *g = (&*g * coef)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn one_step_matches_the_adamw_formula_by_hand() {
        // p = 1, g = 0.5, lr = 0.1, wd = 0.01, first step:
        // decayed = 1 * (1 - 0.1 * 0.01) = 0.999
        // m = 0.05, v = 0.00025; m_hat = 0.5, v_hat = 0.25 -> update = 0.1 * 0.5 / (0.5 + 1e-8)
        // p = 0.999 - 0.1 * 0.99999998 = 0.899000002
        let var = Var::new(&[1.0f32], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![var.clone()], AdamWConfig::default()).unwrap();
        let loss = (var.as_tensor() * 0.5).unwrap().sum_all().unwrap();
        let grads = grads_of(&loss.backward().unwrap(), std::slice::from_ref(&var));
        opt.step(&grads, 0.1).unwrap();
        let p = var.as_tensor().to_vec1::<f32>().unwrap()[0] as f64;
        assert!((p - 0.899_000_002).abs() < 1e-6, "{p}");
        assert_eq!(opt.steps(), 1);
    }

    #[test]
    fn state_round_trip_resumes_identically() {
        // Two variables, the second without a gradient at step 1: its own update count
        // is part of the state.
        let run = |restore_after: Option<usize>| {
            let a = Var::new(&[1.0f32, -2.0, 3.0], &Device::Cpu).unwrap();
            let b = Var::new(&[0.5f32], &Device::Cpu).unwrap();
            let vars = vec![a.clone(), b.clone()];
            let mut opt = AdamW::new(vars.clone(), AdamWConfig::default()).unwrap();
            for step in 0..5 {
                if restore_after == Some(step) {
                    // Rebuild the optimiser from its saved state, as a resumed run does.
                    let (state, steps) = (opt.state().unwrap(), opt.steps());
                    opt = AdamW::new(vars.clone(), AdamWConfig::default()).unwrap();
                    opt.restore(&state, steps).unwrap();
                }
                let loss = (a.as_tensor().sqr().unwrap().sum_all().unwrap()
                    + b.as_tensor().sum_all().unwrap())
                .unwrap();
                let mut grads = grads_of(&loss.backward().unwrap(), &vars);
                if step == 1 {
                    grads[1] = None;
                }
                opt.step(&grads, 0.05).unwrap();
            }
            let mut out = a.as_tensor().to_vec1::<f32>().unwrap();
            out.extend(b.as_tensor().to_vec1::<f32>().unwrap());
            out
        };
        assert_eq!(run(None), run(Some(3)));
    }

    /// tests/fixtures/adamw_reference.json (tests/reference/adamw_reference.py).
    #[derive(serde::Deserialize)]
    struct Reference {
        shapes: Vec<Vec<usize>>,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
        initial: Vec<Vec<f32>>,
        steps: Vec<ReferenceStep>,
    }

    #[derive(serde::Deserialize)]
    struct ReferenceStep {
        lr: f64,
        grads: Vec<Option<Vec<f32>>>,
        after: Vec<Vec<f32>>,
    }

    #[test]
    fn six_steps_equal_torch_adamw_with_a_skipped_gradient() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/adamw_reference.json"
        ))
        .unwrap();
        let r: Reference = serde_json::from_str(&text).unwrap();
        let vars: Vec<Var> = r
            .initial
            .iter()
            .zip(&r.shapes)
            .map(|(values, shape)| {
                Var::from_tensor(
                    &Tensor::from_vec(values.clone(), shape.as_slice(), &Device::Cpu).unwrap(),
                )
                .unwrap()
            })
            .collect();
        let config = AdamWConfig {
            lr: r.steps[0].lr,
            beta1: r.beta1,
            beta2: r.beta2,
            eps: r.eps,
            weight_decay: r.weight_decay,
        };
        let mut opt = AdamW::new(vars.clone(), config).unwrap();
        let mut worst = 0.0f64;
        for (n, step) in r.steps.iter().enumerate() {
            let grads: Vec<Option<Tensor>> = step
                .grads
                .iter()
                .zip(&r.shapes)
                .map(|(g, shape)| {
                    g.as_ref().map(|g| {
                        Tensor::from_vec(g.clone(), shape.as_slice(), &Device::Cpu).unwrap()
                    })
                })
                .collect();
            opt.step(&grads, step.lr).unwrap();
            for (var, want) in vars.iter().zip(&step.after) {
                let got = var
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                for (g, w) in got.iter().zip(want) {
                    let err = (f64::from(*g) - f64::from(*w)).abs();
                    worst = worst.max(err);
                    assert!(err <= 2e-6, "step {}: {g} vs torch {w}", n + 1);
                }
            }
        }
        // The steps moved the weights by far more than the tolerance: a swapped beta or
        // a bias correction of the wrong step would not pass.
        let moved = (f64::from(
            vars[0]
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()[0],
        ) - f64::from(r.initial[0][0]))
        .abs();
        assert!(moved > 1e-2, "{moved}");
        assert!(worst <= 2e-6, "{worst}");
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let a = Var::new(&[3.0f32], &Device::Cpu).unwrap();
        let b = Var::new(&[4.0f32], &Device::Cpu).unwrap();
        // d/da (3a) = 3, d/db (4b) = 4: global norm 5.
        let loss = ((a.as_tensor() * 3.0).unwrap() + (b.as_tensor() * 4.0).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let vars = vec![a.clone(), b.clone()];
        let mut grads = grads_of(&loss.backward().unwrap(), &vars);
        let norm = clip_grad_norm(&mut grads, 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-9);
        let ga = grads[0].as_ref().unwrap().to_vec1::<f32>().unwrap()[0];
        let gb = grads[1].as_ref().unwrap().to_vec1::<f32>().unwrap()[0];
        // 3 * 1 / (5 + 1e-6) and 4 * 1 / (5 + 1e-6).
        assert!(
            (ga - 0.6).abs() < 1e-6 && (gb - 0.8).abs() < 1e-6,
            "{ga} {gb}"
        );
        // Under the max, nothing changes.
        let norm = clip_grad_norm(&mut grads, 10.0).unwrap();
        assert!((norm - 1.0).abs() < 1e-5);
    }
}
