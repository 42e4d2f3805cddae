//! Timely's cluster as the command line and `[engine]` name it: this process's place
//! among the processes (`-n/--processes`, `-p/--process`, `--hostfile`), and timely's
//! configuration for it. What the processes do together is `dataflow::cluster`'s.

use std::path::{Path, PathBuf};

use crate::error::EngineError;

/// The first port of the addresses timely uses without a hostfile (`localhost:2101`,
/// `localhost:2102`, ...), as its own examples do.
pub const DEFAULT_BASE_PORT: u16 = 2101;

/// This process's place in the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// Processes in all (1: no cluster).
    pub processes: usize,
    /// This process's index, `0..processes`.
    pub process: usize,
    /// Every process's `host:port`, by index.
    pub addresses: Vec<String>,
    /// The hostfile named (resolved), kept for a command line that changes `-n` or `-p`
    /// over the configuration's.
    pub hostfile: Option<PathBuf>,
}

/// How exact retrievals are shared: over which cluster (its processes' timely workers
/// each), from how many scores on.
#[derive(Debug, Clone, Default)]
pub struct Sharing {
    pub cluster: Cluster,
    pub workers: usize,
    /// Retrievals of fewer scores (queries x passages) run on process 0 alone.
    pub min_scores: u64,
}

/// The default of [`Sharing::min_scores`] (`[engine] min_shared_scores`): sharing a
/// retrieval (`dataflow/shared_top_k.rs`) joins the cluster twice (an announcement, then the rounds), up to a second
/// each when timely's first connection is refused and retried; a product of 2^24 scores
/// of MiniLM's 384 dimensions (6.4 GFLOP) takes about that on one of these cores.
pub const MIN_SHARED_SCORES: u64 = 1 << 24;

impl Default for Cluster {
    fn default() -> Self {
        Self::single()
    }
}

impl Cluster {
    /// One process.
    pub fn single() -> Self {
        Self {
            processes: 1,
            process: 0,
            addresses: Vec::new(),
            hostfile: None,
        }
    }

    /// The cluster `-n processes -p process [--hostfile hostfile]` names: the hostfile's
    /// first `processes` lines (`host:port` each; blank lines and `#` comments skipped),
    /// or `localhost:2101` onwards without one.
    pub fn new(
        processes: usize,
        process: usize,
        hostfile: Option<&Path>,
    ) -> Result<Self, EngineError> {
        if processes == 0 {
            return Err(EngineError::Invalid(
                "--processes: at least 1 process".into(),
            ));
        }
        if process >= processes {
            return Err(EngineError::Invalid(format!(
                "--process {process}: the processes are numbered 0 to {} (--processes {processes})",
                processes - 1
            )));
        }
        let hostfile_named = hostfile.map(Path::to_path_buf);
        if processes == 1 {
            return Ok(Self {
                hostfile: hostfile_named,
                ..Self::single()
            });
        }
        let addresses = match hostfile {
            Some(path) => read_hostfile(path, processes)?,
            None => (0..processes)
                .map(|i| format!("localhost:{}", usize::from(DEFAULT_BASE_PORT) + i))
                .collect(),
        };
        Ok(Self {
            processes,
            process,
            addresses,
            hostfile: hostfile_named,
        })
    }

    /// More than one process.
    pub fn is_distributed(&self) -> bool {
        self.processes > 1
    }

    /// This process leads: it reads, decides and writes.
    pub fn is_leader(&self) -> bool {
        self.process == 0
    }

    /// This process's index among the cluster's processes on its host (the processes
    /// before it whose address names the same host): which of the host's GPUs it takes
    /// with `[engine] device = "cuda:{local}"`.
    pub fn local_index(&self) -> usize {
        let host = |a: &String| a.rsplit_once(':').map_or(a.clone(), |(h, _)| h.to_string());
        let Some(mine) = self.addresses.get(self.process).map(host) else {
            return 0;
        };
        self.addresses[..self.process]
            .iter()
            .filter(|a| host(a) == mine)
            .count()
    }

    /// Timely's configuration for `workers` threads in this process.
    pub fn timely_config(&self, workers: usize) -> timely::Config {
        let workers = workers.max(1);
        if !self.is_distributed() {
            return timely::Config::process(workers);
        }
        timely::Config {
            communication: timely::CommunicationConfig::Cluster {
                threads: workers,
                process: self.process,
                addresses: self.addresses.clone(),
                report: false,
                zerocopy: false,
            },
            worker: timely::WorkerConfig::default(),
        }
    }
}

/// The first `processes` addresses of `path`, each checked to be `host:port`.
fn read_hostfile(path: &Path, processes: usize) -> Result<Vec<String>, EngineError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        EngineError::Invalid(format!("cannot read the hostfile {}: {e}", path.display()))
    })?;
    let mut addresses = Vec::with_capacity(processes);
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let port = line
            .rsplit_once(':')
            .map(|(host, port)| (host, port.parse::<u16>()));
        match port {
            Some((host, Ok(_))) if !host.is_empty() => addresses.push(line.to_string()),
            _ => {
                return Err(EngineError::Invalid(format!(
                    "{} line {}: `{line}` is not host:port",
                    path.display(),
                    number + 1
                )))
            }
        }
        if addresses.len() == processes {
            return Ok(addresses);
        }
    }
    Err(EngineError::Invalid(format!(
        "{}: {} address(es) for --processes {processes}",
        path.display(),
        addresses.len()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostfile_lines_are_read_in_order_and_bad_ones_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hosts");
        std::fs::write(
            &path,
            "# the cluster\nnode-a:2101\n\n10.0.0.2:2200\nextra:1\n",
        )
        .unwrap();
        let c = Cluster::new(2, 1, Some(&path)).unwrap();
        assert_eq!(c.addresses, ["node-a:2101", "10.0.0.2:2200"]);
        assert!(c.is_distributed() && !c.is_leader());

        let err = Cluster::new(4, 0, Some(&path)).unwrap_err().to_string();
        assert!(err.contains("3 address(es) for --processes 4"), "{err}");
        std::fs::write(&path, "node-a:2101\nnode-b\n").unwrap();
        let err = Cluster::new(2, 0, Some(&path)).unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("node-b"), "{err}");
        let err = Cluster::new(2, 2, None).unwrap_err().to_string();
        assert!(err.contains("numbered 0 to 1"), "{err}");
    }

    #[test]
    fn a_process_is_numbered_among_the_processes_of_its_host() {
        let dir = tempfile::tempdir().unwrap();
        let hosts = dir.path().join("hosts");
        std::fs::write(
            &hosts,
            "node-a:2101\nnode-b:2101\nnode-a:2102\n10.0.0.7:2101\nnode-a:2103\n",
        )
        .unwrap();
        let local: Vec<usize> = (0..5)
            .map(|p| Cluster::new(5, p, Some(&hosts)).unwrap().local_index())
            .collect();
        assert_eq!(local, [0, 0, 1, 0, 2]);
        // Without a hostfile every process is on localhost: its index.
        assert_eq!(Cluster::new(3, 2, None).unwrap().local_index(), 2);
        assert_eq!(Cluster::single().local_index(), 0);
    }

    #[test]
    fn without_a_hostfile_the_processes_are_on_localhost_from_2101() {
        let c = Cluster::new(3, 0, None).unwrap();
        assert_eq!(
            c.addresses,
            ["localhost:2101", "localhost:2102", "localhost:2103"]
        );
        assert_eq!(Cluster::new(1, 0, None).unwrap(), Cluster::single());
    }
}
