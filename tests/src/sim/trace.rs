//! Job traces: when each task is enqueued and how long it runs.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Exp};

/// One task of a trace.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TaskSpec {
    /// Seconds from the start of the trace to the enqueue.
    pub arrival_s: f64,
    /// Seconds the task runs once an agent takes it.
    pub runtime_s: f64,
}

/// A named list of tasks sorted by arrival.
#[derive(Debug, Clone)]
pub struct Trace {
    pub name: String,
    pub tasks: Vec<TaskSpec>,
}

/// Where a trace comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum TraceSource {
    /// Arrivals of `pollux-arrivals-N.csv`, run times drawn from `philly-runtimes.csv`.
    Pollux(u8),
    /// Tasks enqueued all at once, like a hyperparameter sweep.
    Sweep,
    /// Arrivals of a Poisson process at a constant rate.
    Poisson,
    /// Arrivals of a Poisson process whose rate follows the time of day.
    Diurnal,
    /// A CSV file with the columns `arrival_s,runtime_s`.
    Csv(PathBuf),
}

/// Settings that shape generated traces.
#[derive(Debug, Clone)]
pub struct TraceOptions {
    /// Folder with `philly-runtimes.csv` and `pollux-arrivals-N.csv`.
    pub traces_dir: PathBuf,
    /// Seed of the run-time draws and of generated arrivals, so the same seed gives the same trace.
    pub seed: u64,
    /// Number of tasks of the sweep, Poisson and diurnal traces; `None` means 200, 1,000 and 1,000.
    pub tasks: Option<usize>,
    /// Mean arrival rate of the Poisson and diurnal traces, in tasks per hour.
    pub rate_per_hour: f64,
    /// Whether a pollux job enqueues `num_replicas` tasks at once (a sweep) instead of one task.
    pub replicas_as_tasks: bool,
}

/// Errors of trace loading.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("failed to read trace file {path}: {source}; check --traces-dir or the path")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid trace file {path}, line {line}: {reason}")]
    Invalid {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error(
        "unknown trace {0:?}: expected pollux-1 to pollux-8, sweep, poisson, diurnal or the path of a CSV file"
    )]
    UnknownTrace(String),
}

impl FromStr for TraceSource {
    type Err = TraceError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if let Some(number) = text.strip_prefix("pollux-") {
            return match number.parse::<u8>() {
                Ok(n @ 1..=8) => Ok(Self::Pollux(n)),
                _ => Err(TraceError::UnknownTrace(text.to_string())),
            };
        }
        match text {
            "sweep" => Ok(Self::Sweep),
            "poisson" => Ok(Self::Poisson),
            "diurnal" => Ok(Self::Diurnal),
            path if path.ends_with(".csv") => Ok(Self::Csv(PathBuf::from(path))),
            _ => Err(TraceError::UnknownTrace(text.to_string())),
        }
    }
}

impl fmt::Display for TraceSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pollux(n) => write!(f, "pollux-{n}"),
            Self::Sweep => f.write_str("sweep"),
            Self::Poisson => f.write_str("poisson"),
            Self::Diurnal => f.write_str("diurnal"),
            Self::Csv(path) => write!(f, "{}", path.display()),
        }
    }
}

/// Builds the trace of `source`.
pub fn load(source: &TraceSource, options: &TraceOptions) -> Result<Trace, TraceError> {
    let mut rng = StdRng::seed_from_u64(options.seed);
    let mut tasks = match source {
        TraceSource::Pollux(n) => {
            let runtimes = read_runtimes(&options.traces_dir.join("philly-runtimes.csv"))?;
            let path = options.traces_dir.join(format!("pollux-arrivals-{n}.csv"));
            pollux_tasks(&path, &runtimes, options.replicas_as_tasks, &mut rng)?
        }
        TraceSource::Sweep => {
            let runtimes = read_runtimes(&options.traces_dir.join("philly-runtimes.csv"))?;
            let count = options.tasks.unwrap_or(200);
            (0..count)
                .map(|_| TaskSpec {
                    arrival_s: 0.0,
                    runtime_s: draw(&runtimes, &mut rng),
                })
                .collect()
        }
        TraceSource::Poisson | TraceSource::Diurnal => {
            let runtimes = read_runtimes(&options.traces_dir.join("philly-runtimes.csv"))?;
            let count = options.tasks.unwrap_or(1000);
            let daily = *source == TraceSource::Diurnal;
            poisson_tasks(count, options.rate_per_hour, daily, &runtimes, &mut rng)
        }
        TraceSource::Csv(path) => csv_tasks(path)?,
    };
    tasks.sort_by(|a, b| a.arrival_s.total_cmp(&b.arrival_s));
    Ok(Trace {
        name: source.to_string(),
        tasks,
    })
}

/// Reads the `runtime` column (seconds) of the Philly run-time file.
fn read_runtimes(path: &Path) -> Result<Vec<f64>, TraceError> {
    let table = read_csv(path)?;
    let column = table.column("runtime")?;
    let runtimes = table.rows_of(column)?;
    if runtimes.is_empty() {
        return Err(table.invalid(1, "no run times".to_string()));
    }
    Ok(runtimes)
}

fn draw(runtimes: &[f64], rng: &mut StdRng) -> f64 {
    runtimes[rng.random_range(0..runtimes.len())]
}

/// Reads a pollux workload: `time` is the submission offset in seconds, `num_replicas` the tasks of a job.
fn pollux_tasks(
    path: &Path,
    runtimes: &[f64],
    replicas_as_tasks: bool,
    rng: &mut StdRng,
) -> Result<Vec<TaskSpec>, TraceError> {
    let table = read_csv(path)?;
    let time = table.column("time")?;
    let replicas = table.column("num_replicas")?;
    let mut tasks = Vec::new();
    for (line, fields) in table.records() {
        let arrival_s = table.number(line, fields, time)?;
        let count = if replicas_as_tasks {
            table.number(line, fields, replicas)?.max(1.0) as usize
        } else {
            1
        };
        for _ in 0..count {
            tasks.push(TaskSpec {
                arrival_s,
                runtime_s: draw(runtimes, rng),
            });
        }
    }
    Ok(tasks)
}

/// Draws `count` arrivals of a Poisson process with `rate_per_hour` on average.
///
/// With `daily`, the rate follows `1 + 0.8 sin` over 24 hours, lowest at 00:00 and highest at 12:00 of each
/// simulated day, by thinning a process at the peak rate.
fn poisson_tasks(
    count: usize,
    rate_per_hour: f64,
    daily: bool,
    runtimes: &[f64],
    rng: &mut StdRng,
) -> Vec<TaskSpec> {
    const AMPLITUDE: f64 = 0.8;
    let mean_rate = rate_per_hour / 3600.0;
    let peak_rate = if daily {
        mean_rate * (1.0 + AMPLITUDE)
    } else {
        mean_rate
    };
    let gaps = Exp::new(peak_rate).expect("the arrival rate is positive");

    let mut tasks = Vec::with_capacity(count);
    let mut now = 0.0;
    while tasks.len() < count {
        now += gaps.sample(rng);
        if daily {
            let phase = 2.0 * std::f64::consts::PI * (now / 86_400.0 - 0.25);
            let rate = mean_rate * (1.0 + AMPLITUDE * phase.sin());
            if rng.random::<f64>() * peak_rate > rate {
                continue;
            }
        }
        tasks.push(TaskSpec {
            arrival_s: now,
            runtime_s: draw(runtimes, rng),
        });
    }
    tasks
}

/// Reads a CSV trace with the columns `arrival_s` and `runtime_s` (seconds).
fn csv_tasks(path: &Path) -> Result<Vec<TaskSpec>, TraceError> {
    let table = read_csv(path)?;
    let arrival = table.column("arrival_s")?;
    let runtime = table.column("runtime_s")?;
    table
        .records()
        .map(|(line, fields)| {
            Ok(TaskSpec {
                arrival_s: table.number(line, fields, arrival)?,
                runtime_s: table.number(line, fields, runtime)?,
            })
        })
        .collect()
}

/// A CSV file without quoting, which is all the trace files use.
struct Table {
    path: PathBuf,
    header: Vec<String>,
    lines: Vec<(usize, Vec<String>)>,
}

fn read_csv(path: &Path) -> Result<Table, TraceError> {
    let text = std::fs::read_to_string(path).map_err(|source| TraceError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(index, line)| (index + 1, line.trim()))
        .filter(|(_, line)| !line.is_empty());
    let header = lines
        .next()
        .map(|(_, line)| {
            line.split(',')
                .map(|name| name.trim().to_string())
                .collect()
        })
        .unwrap_or_default();
    let lines = lines
        .map(|(number, line)| {
            (
                number,
                line.split(',')
                    .map(|field| field.trim().to_string())
                    .collect(),
            )
        })
        .collect();
    Ok(Table {
        path: path.to_path_buf(),
        header,
        lines,
    })
}

impl Table {
    fn invalid(&self, line: usize, reason: String) -> TraceError {
        TraceError::Invalid {
            path: self.path.clone(),
            line,
            reason,
        }
    }

    fn column(&self, name: &str) -> Result<usize, TraceError> {
        self.header
            .iter()
            .position(|column| column == name)
            .ok_or_else(|| {
                self.invalid(
                    1,
                    format!("missing column {name:?}, the header is {:?}", self.header),
                )
            })
    }

    fn records(&self) -> impl Iterator<Item = (usize, &[String])> {
        self.lines
            .iter()
            .map(|(line, fields)| (*line, fields.as_slice()))
    }

    fn number(&self, line: usize, fields: &[String], column: usize) -> Result<f64, TraceError> {
        let text = fields.get(column).ok_or_else(|| {
            self.invalid(line, format!("missing column {:?}", self.header[column]))
        })?;
        let value: f64 = text
            .parse()
            .map_err(|_| self.invalid(line, format!("{:?} is not a number", text)))?;
        if !value.is_finite() || value < 0.0 {
            return Err(self.invalid(
                line,
                format!("{value} is not a non-negative number of seconds"),
            ));
        }
        Ok(value)
    }

    fn rows_of(&self, column: usize) -> Result<Vec<f64>, TraceError> {
        self.records()
            .map(|(line, fields)| self.number(line, fields, column))
            .collect()
    }
}
