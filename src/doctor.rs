//! `distillery doctor`: what this binary was built with, which devices it can use, and
//! why a requested device is unavailable. What a user runs first on a new machine, and
//! before renting a GPU for a long job.

use std::fmt::Write as _;

use candle_core::{Device, Tensor};

use crate::config::{cluster::Cluster, resolve_device};

/// Whether this binary was built with `--features cuda`.
pub const CUDA_BUILD: bool = cfg!(feature = "cuda");

/// The report's lines on the build, the CPU and the GPUs.
pub fn report() -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "distillery {} ({} build, features: cuda={})",
        env!("CARGO_PKG_VERSION"),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        if CUDA_BUILD { "yes" } else { "no" }
    );
    let _ = writeln!(
        out,
        "threads: {} (what the model's kernels use unless --threads says otherwise)",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    out.push_str(&distillery_operators::cpu_report());
    out.push_str("devices:\n  cpu: available\n");
    match gpus() {
        Ok(gpus) if gpus.is_empty() => out.push_str("  cuda: no GPU found by the driver\n"),
        Ok(gpus) => {
            for gpu in gpus {
                let _ = writeln!(out, "  {gpu}");
            }
        }
        Err(why) => {
            let _ = writeln!(out, "  cuda: unavailable: {why}");
        }
    }
    out
}

/// Opens `name` (`cpu`, `cuda:N`) as a run would and multiplies two small matrices on
/// it: `Ok` with what ran, or the reason the device cannot be used.
pub fn check_device(name: &str) -> Result<String, String> {
    let device = resolve_device(name, &Cluster::single())?;
    let ran =
        small_product(&device).map_err(|e| format!("{name} opened but failed to run: {e}"))?;
    Ok(format!("{name}: a matrix product ran ({ran})"))
}

/// `[[1, 2], [3, 4]]` squared on `device`, checked against the answer.
fn small_product(device: &Device) -> candle_core::Result<String> {
    let a = Tensor::new(&[[1f32, 2.], [3., 4.]], device)?;
    let got = a.matmul(&a)?.to_device(&Device::Cpu)?.to_vec2::<f32>()?;
    let want = vec![vec![7f32, 10.], vec![15., 22.]];
    if got == want {
        Ok("result exact".into())
    } else {
        Err(candle_core::Error::Msg(format!(
            "[[1,2],[3,4]] squared gave {got:?}, not {want:?}"
        )))
    }
}

/// One line per GPU the driver sees: ordinal, name, compute capability, memory.
#[cfg(feature = "cuda")]
fn gpus() -> Result<Vec<String>, String> {
    use candle_core::cuda_backend::cudarc::driver::CudaContext;
    let count = CudaContext::device_count().map_err(|e| format!("the CUDA driver: {e}"))?;
    (0..count.max(0) as usize)
        .map(|ordinal| {
            let ctx = CudaContext::new(ordinal).map_err(|e| format!("cuda:{ordinal}: {e}"))?;
            let name = ctx
                .name()
                .unwrap_or_else(|e| format!("(name unknown: {e})"));
            let (major, minor) = ctx.compute_capability().unwrap_or((0, 0));
            let memory = ctx.total_mem().unwrap_or(0) as f64 / f64::from(1u32 << 30);
            Ok(format!(
                "cuda:{ordinal}: {name}, compute capability {major}.{minor}, {memory:.1} GiB"
            ))
        })
        .collect()
}

#[cfg(not(feature = "cuda"))]
fn gpus() -> Result<Vec<String>, String> {
    Err("this build has no CUDA support (tools/build-cuda.sh builds one)".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_names_the_build_and_the_cpu_path() {
        let text = report();
        assert!(text.starts_with(&format!("distillery {} (", env!("CARGO_PKG_VERSION"))));
        assert!(text.contains(if CUDA_BUILD { "cuda=yes" } else { "cuda=no" }));
        assert!(text.contains("  cpu: available"), "{text}");
        // cpu_report's path line.
        assert!(text.contains("\ncpu path: "), "{text}");
    }

    #[test]
    fn the_cpu_runs_and_a_bad_name_says_what_is_expected() {
        assert_eq!(
            check_device("cpu"),
            Ok("cpu: a matrix product ran (result exact)".into())
        );
        let err = check_device("gpu0").unwrap_err();
        assert!(err.contains("expected `cpu`, `cuda:N`"), "{err}");
        if !CUDA_BUILD {
            let err = check_device("cuda:0").unwrap_err();
            assert!(err.contains("no CUDA support"), "{err}");
        }
    }
}
