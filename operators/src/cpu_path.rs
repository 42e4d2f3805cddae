//! Which compiled copy of the hand-written CPU kernels runs: the CPU path.
//!
//! The kernels of [`crate::cpu_bert`], of the student's training pass and of the LLM's
//! CPU attention are written once as plain loops and compiled three times on x86-64:
//! for the baseline target ([`CpuPath::Generic`], SSE2 only), with AVX2 and FMA
//! ([`CpuPath::Avx2`]), and with AVX-512 ([`CpuPath::Avx512`]). Other targets have the
//! generic copy alone.
//!
//! The CPU's features are detected once per process. The path that runs is the best the
//! CPU supports unless the environment variable [`CPU_ENV`] (`DISTILLERY_CPU`) forces one:
//! `generic`, `avx2` or `avx512` (ASCII case ignored; empty means unset). It is read once,
//! the first time [`CpuPath::active`] is asked. A value naming no path, or a path this CPU
//! cannot run, is an error ([`CpuPathError`]) that model loaders return; nothing ever runs
//! a copy compiled for features the CPU lacks.
//!
//! Models take the active path when they load and keep it, and can be switched to
//! another path the CPU supports (`set_cpu_path` on the embedder, cross-encoder, student
//! and LLM generator): there is no process-wide mutable choice. Kernels receive the path
//! as a [`SupportedPath`], a value that only exists for paths the CPU was checked to run;
//! that check is what makes calling the feature-specific copies sound.
//!
//! What the copies cover: every hand-written kernel (element-wise activations, softmax
//! exponentials, layer norms, their backward passes, the LLM's attention and its Q8_0
//! matrix products, `llm::q8_product`, whose AVX-512 copy multiplies with VNNI where the
//! CPU has it and gives the same bits as the others). Dense matrix products go through
//! the `gemm` crate and candle, which detect the CPU's features on their own and do not
//! follow this choice.

use std::fmt;
use std::sync::OnceLock;

/// The environment variable that forces a CPU path: `generic`, `avx2` or `avx512`.
pub const CPU_ENV: &str = "DISTILLERY_CPU";

/// The values [`CPU_ENV`] accepts, as error messages list them.
pub const ACCEPTED: &str = "generic, avx2, avx512";

/// One compiled copy of the hand-written kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CpuPath {
    /// The baseline target's copy (SSE2 on x86-64): runs on every CPU.
    Generic,
    /// Compiled with AVX2 and FMA (x86-64-v3: Haswell, Zen 1 and later).
    Avx2,
    /// Compiled with AVX-512 F and VL besides AVX2 and FMA (x86-64-v4 subset).
    Avx512,
}

/// Why a CPU path cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpuPathError {
    /// [`CPU_ENV`] holds a value that names no path.
    #[error("{var}={value:?} names no CPU path (accepted: {ACCEPTED}, or unset for the best this CPU runs)", var = CPU_ENV)]
    Unknown {
        /// The variable's value (lossily decoded when it is not Unicode).
        value: String,
    },
    /// A path was asked for (through [`CPU_ENV`] or a model's `set_cpu_path`) that needs
    /// features this CPU lacks.
    #[error(
        "the {path} CPU path needs {needs}, and this CPU lacks {missing} \
         (paths it runs: {runs}; {var} chooses among them)",
        needs = path.features().join(", "),
        var = CPU_ENV
    )]
    Unsupported {
        /// The path asked for.
        path: CpuPath,
        /// The missing features, comma-separated.
        missing: String,
        /// The paths this CPU runs, comma-separated.
        runs: String,
    },
}

impl fmt::Display for CpuPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for CpuPath {
    type Err = CpuPathError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CpuPath::parse(s)
    }
}

impl CpuPath {
    /// Every path, slowest first.
    pub const ALL: [CpuPath; 3] = [CpuPath::Generic, CpuPath::Avx2, CpuPath::Avx512];

    /// The name [`CPU_ENV`] and reports use: `generic`, `avx2` or `avx512`.
    pub fn name(self) -> &'static str {
        match self {
            CpuPath::Generic => "generic",
            CpuPath::Avx2 => "avx2",
            CpuPath::Avx512 => "avx512",
        }
    }

    /// The path a name (as [`CpuPath::name`] gives it, ASCII case ignored) stands for.
    pub fn parse(name: &str) -> Result<CpuPath, CpuPathError> {
        CpuPath::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(name.trim()))
            .ok_or_else(|| CpuPathError::Unknown {
                value: name.to_string(),
            })
    }

    /// The CPU features (as `is_x86_feature_detected!` names them) the path's copy is
    /// compiled with, hence needs.
    pub fn features(self) -> &'static [&'static str] {
        match self {
            CpuPath::Generic => &[],
            CpuPath::Avx2 => &["avx2", "fma"],
            CpuPath::Avx512 => &["avx512f", "avx512vl", "avx2", "fma"],
        }
    }

    /// The features of [`CpuPath::features`] this CPU lacks (detected once per process).
    pub fn missing_features(self) -> Vec<&'static str> {
        self.features()
            .iter()
            .copied()
            .filter(|f| !detected().has(f))
            .collect()
    }

    /// Whether this CPU runs the path.
    pub fn is_supported(self) -> bool {
        detected().supports(self)
    }

    /// The paths this CPU runs, slowest first (always `generic` among them).
    pub fn supported() -> Vec<CpuPath> {
        CpuPath::ALL
            .into_iter()
            .filter(|p| p.is_supported())
            .collect()
    }

    /// The best path this CPU runs, whatever [`CPU_ENV`] says.
    pub fn best() -> CpuPath {
        SupportedPath::best().path()
    }

    /// The path models use unless told otherwise: the one [`CPU_ENV`] forces, or the
    /// best this CPU runs when it is unset or empty. The variable is read, and the
    /// answer fixed, the first time this is called.
    pub fn active() -> Result<CpuPath, CpuPathError> {
        SupportedPath::active().map(SupportedPath::path)
    }

    /// The path a [`CPU_ENV`] value chooses on this CPU (`None` or empty: the best),
    /// checked as [`CpuPath::active`] checks it; for tests and reports, which must not
    /// depend on the process's environment.
    pub fn choose(forced: Option<&str>) -> Result<CpuPath, CpuPathError> {
        choose(forced, detected()).map(SupportedPath::path)
    }

    /// `self`, checked to be one this CPU runs.
    pub(crate) fn check(self) -> Result<SupportedPath, CpuPathError> {
        detected().check(self)
    }
}

/// A [`CpuPath`] this CPU was checked to run. Only [`CpuPath::check`] and the
/// constructors here make one, so a kernel given a `SupportedPath` may call the copy
/// compiled for its features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SupportedPath(CpuPath);

impl SupportedPath {
    /// The generic path, which every CPU runs.
    pub const GENERIC: SupportedPath = SupportedPath(CpuPath::Generic);

    /// The path this is.
    pub fn path(self) -> CpuPath {
        self.0
    }

    /// The best path this CPU runs.
    pub fn best() -> SupportedPath {
        detected().best()
    }

    /// The path [`CpuPath::active`] reports, checked.
    pub fn active() -> Result<SupportedPath, CpuPathError> {
        static ACTIVE: OnceLock<Result<SupportedPath, CpuPathError>> = OnceLock::new();
        ACTIVE
            .get_or_init(|| {
                let forced = match std::env::var_os(CPU_ENV) {
                    None => None,
                    Some(v) => match v.into_string() {
                        Ok(v) => Some(v),
                        Err(v) => {
                            return Err(CpuPathError::Unknown {
                                value: v.to_string_lossy().into_owned(),
                            })
                        }
                    },
                };
                choose(forced.as_deref(), detected())
            })
            .clone()
    }

    /// Every path this CPU runs, slowest first: what tests iterate over.
    pub fn all_supported() -> Vec<SupportedPath> {
        CpuPath::ALL
            .into_iter()
            .filter_map(|p| p.check().ok())
            .collect()
    }
}

/// The CPU features the paths depend on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Features {
    avx2: bool,
    fma: bool,
    avx512f: bool,
    avx512vl: bool,
}

impl Features {
    fn has(&self, feature: &str) -> bool {
        match feature {
            "avx2" => self.avx2,
            "fma" => self.fma,
            "avx512f" => self.avx512f,
            "avx512vl" => self.avx512vl,
            _ => false,
        }
    }

    fn supports(&self, path: CpuPath) -> bool {
        path.features().iter().all(|f| self.has(f))
    }

    fn best(&self) -> SupportedPath {
        let best = CpuPath::ALL
            .into_iter()
            .rev()
            .find(|p| self.supports(*p))
            .unwrap_or(CpuPath::Generic);
        SupportedPath(best)
    }

    fn check(&self, path: CpuPath) -> Result<SupportedPath, CpuPathError> {
        if self.supports(path) {
            return Ok(SupportedPath(path));
        }
        let missing: Vec<&str> = path
            .features()
            .iter()
            .copied()
            .filter(|f| !self.has(f))
            .collect();
        let runs: Vec<&str> = CpuPath::ALL
            .into_iter()
            .filter(|p| self.supports(*p))
            .map(CpuPath::name)
            .collect();
        Err(CpuPathError::Unsupported {
            path,
            missing: missing.join(", "),
            runs: runs.join(", "),
        })
    }
}

/// The path a [`CPU_ENV`] value chooses on a CPU with `features`.
fn choose(forced: Option<&str>, features: Features) -> Result<SupportedPath, CpuPathError> {
    match forced.map(str::trim) {
        None | Some("") => Ok(features.best()),
        Some(name) => features.check(CpuPath::parse(name)?),
    }
}

/// This CPU's features, detected once.
fn detected() -> Features {
    static FEATURES: OnceLock<Features> = OnceLock::new();
    *FEATURES.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Features {
    Features {
        avx2: std::arch::is_x86_feature_detected!("avx2"),
        fma: std::arch::is_x86_feature_detected!("fma"),
        avx512f: std::arch::is_x86_feature_detected!("avx512f"),
        avx512vl: std::arch::is_x86_feature_detected!("avx512vl"),
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Features {
    Features::default()
}

/// A short report of the CPU and the path chosen: the model name (from /proc/cpuinfo
/// where there is one), whether the features that matter here are present (avx2, fma,
/// avx512f, avx512vl, avx512_vnni, avx512_bf16, amx), the paths this CPU runs and the
/// one models use (or why [`CPU_ENV`] is refused), and which matrix products follow it.
/// One
/// `key: value` per line.
pub fn cpu_report() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    report_from(&cpuinfo, CpuPath::active())
}

/// [`cpu_report`] from given /proc/cpuinfo text and active path.
fn report_from(cpuinfo: &str, active: Result<CpuPath, CpuPathError>) -> String {
    let field = |name: &str| {
        cpuinfo.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            (key.trim() == name).then(|| value.trim().to_string())
        })
    };
    let model = field("model name").unwrap_or_else(|| "unknown".into());
    let flags = field("flags").unwrap_or_default();
    let flags: Vec<&str> = flags.split_whitespace().collect();
    let os_flag = |name: &str| flags.contains(&name);
    let features = detected();
    // avx2, fma, avx512f and avx512vl as the process detects them (CPUID and the OS's
    // register saving), the others as the kernel lists them; `amx` is any AMX flag.
    let present = [
        ("avx2", features.avx2),
        ("fma", features.fma),
        ("avx512f", features.avx512f),
        ("avx512vl", features.avx512vl),
        ("avx512_vnni", os_flag("avx512_vnni")),
        ("avx512_bf16", os_flag("avx512_bf16")),
        ("amx", flags.iter().any(|f| f.starts_with("amx"))),
    ];
    let listed: Vec<String> = present
        .iter()
        .map(|(name, has)| format!("{name}={}", if *has { "yes" } else { "no" }))
        .collect();
    let runs: Vec<&str> = CpuPath::ALL
        .into_iter()
        .filter(|p| features.supports(*p))
        .map(CpuPath::name)
        .collect();
    let path = match active {
        Ok(p) => p.name().to_string(),
        Err(e) => format!("none: {e}"),
    };
    let forced = std::env::var(CPU_ENV).unwrap_or_default();
    let forced = if forced.trim().is_empty() {
        "unset".to_string()
    } else {
        forced
    };
    format!(
        "cpu: {model}\nfeatures: {}\npaths supported: {}\n{CPU_ENV}: {forced}\n\
         cpu path: {path}\nmatrix products: the LLM's quantized ones follow the path \
         (with VNNI where avx512_vnni=yes); dense ones: gemm and candle choose their own \
         kernels\n",
        listed.join(" "),
        runs.join(", "),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONE: Features = Features {
        avx2: false,
        fma: false,
        avx512f: false,
        avx512vl: false,
    };
    const V3: Features = Features {
        avx2: true,
        fma: true,
        avx512f: false,
        avx512vl: false,
    };
    const V4: Features = Features {
        avx2: true,
        fma: true,
        avx512f: true,
        avx512vl: true,
    };

    #[test]
    fn names_parse_back_and_bad_names_are_refused() {
        for p in CpuPath::ALL {
            assert_eq!(CpuPath::parse(p.name()), Ok(p));
            assert_eq!(p.name().parse::<CpuPath>(), Ok(p));
        }
        assert_eq!(CpuPath::parse("AVX2"), Ok(CpuPath::Avx2));
        assert_eq!(CpuPath::parse(" avx512 "), Ok(CpuPath::Avx512));
        let err = CpuPath::parse("bogus").unwrap_err();
        assert_eq!(
            err,
            CpuPathError::Unknown {
                value: "bogus".into()
            }
        );
        let message = err.to_string();
        assert!(message.contains("DISTILLERY_CPU"), "{message}");
        assert!(message.contains("generic, avx2, avx512"), "{message}");
    }

    #[test]
    fn forcing_chooses_the_path_or_explains_why_not() {
        // Unset or empty: the best the CPU runs.
        assert_eq!(choose(None, V4).map(|p| p.path()), Ok(CpuPath::Avx512));
        assert_eq!(choose(Some(""), V3).map(|p| p.path()), Ok(CpuPath::Avx2));
        assert_eq!(choose(None, NONE).map(|p| p.path()), Ok(CpuPath::Generic));
        // Any path the CPU runs can be forced.
        for (value, want) in [
            ("generic", CpuPath::Generic),
            ("avx2", CpuPath::Avx2),
            ("avx512", CpuPath::Avx512),
        ] {
            assert_eq!(choose(Some(value), V4).map(|p| p.path()), Ok(want));
        }
        assert_eq!(
            choose(Some("generic"), NONE).map(|p| p.path()),
            Ok(CpuPath::Generic)
        );
        // A path the CPU lacks is refused, naming what is missing and what runs.
        let err = choose(Some("avx512"), V3).unwrap_err();
        assert_eq!(
            err,
            CpuPathError::Unsupported {
                path: CpuPath::Avx512,
                missing: "avx512f, avx512vl".into(),
                runs: "generic, avx2".into(),
            }
        );
        let message = err.to_string();
        assert!(message.contains("avx512f, avx512vl"), "{message}");
        assert!(message.contains("DISTILLERY_CPU"), "{message}");
        assert!(choose(Some("avx2"), NONE).is_err());
        // Half of AVX2+FMA is not enough.
        let avx2_only = Features { fma: false, ..V3 };
        assert_eq!(
            choose(Some("avx2"), avx2_only).unwrap_err(),
            CpuPathError::Unsupported {
                path: CpuPath::Avx2,
                missing: "fma".into(),
                runs: "generic".into(),
            }
        );
        assert_eq!(avx2_only.best().path(), CpuPath::Generic);
        assert!(matches!(
            choose(Some("bogus"), V4),
            Err(CpuPathError::Unknown { .. })
        ));
    }

    #[test]
    fn this_cpu_refuses_exactly_the_paths_it_lacks() {
        let supported = CpuPath::supported();
        assert_eq!(supported[0], CpuPath::Generic);
        assert_eq!(CpuPath::best(), *supported.last().unwrap());
        for p in CpuPath::ALL {
            let forced = CpuPath::choose(Some(p.name()));
            if supported.contains(&p) {
                assert_eq!(forced, Ok(p));
                assert!(p.missing_features().is_empty());
            } else {
                assert!(matches!(forced, Err(CpuPathError::Unsupported { path, .. }) if path == p));
                assert!(p.check().is_err());
                assert!(!p.missing_features().is_empty());
            }
        }
        assert_eq!(
            SupportedPath::all_supported()
                .into_iter()
                .map(SupportedPath::path)
                .collect::<Vec<_>>(),
            supported
        );
    }

    #[test]
    fn report_names_the_cpu_its_features_and_the_path() {
        let cpuinfo = "processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse2 avx2 \
                       fma avx512f avx512_bf16 amx_tile\n";
        let report = report_from(cpuinfo, Ok(CpuPath::Generic));
        assert!(report.contains("cpu: Test CPU 9000\n"), "{report}");
        assert!(report.contains("avx512_bf16=yes"), "{report}");
        assert!(report.contains("amx=yes"), "{report}");
        assert!(report.contains("cpu path: generic\n"), "{report}");
        let report = report_from("", Err(CpuPath::parse("bogus").unwrap_err()));
        assert!(report.contains("cpu: unknown\n"), "{report}");
        assert!(report.contains("avx512_bf16=no amx=no"), "{report}");
        assert!(
            report.contains("cpu path: none: DISTILLERY_CPU="),
            "{report}"
        );
    }
}
