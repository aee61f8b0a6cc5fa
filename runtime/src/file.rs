//! Configuration files: pools described in TOML, one table per pool, and the settings of a
//! [`Runtime`](crate::Runtime).
//!
//! This module owns the file format: its keys, how durations and sizes are written, and
//! turning every mistake into a [`ConfigIssue`] that names the file, the line and the key. The
//! builder and its defaults stay in [`crate::config`]: a key left out keeps
//! [`PoolBuilder`]'s default, and every pool read from a file is checked with
//! [`PoolConfig::validate`] before it is handed out.
//!
//! ```toml
//! [runtime]
//! idle_timeout = "10m"        # stop pools unused this long (default: never)
//!
//! [pools.ml]
//! size = 4
//! call_timeout = "30s"
//! max_rss = "512MiB"
//!
//! [pools.ml.process]           # or [pools.ml.container], exactly one of the two
//! command = ["python3", "-m", "wharf_worker.demo"]
//! env = { MODEL = "small" }
//!
//! [[engines]]                  # Docker engines container pools may spread over
//! name = "h2"
//! host = "tcp://10.250.0.2:2376"
//! tls_ca = "certs/ca.pem"      # TLS files, relative to the current directory
//! tls_cert = "certs/cert.pem"
//! tls_key = "certs/key.pem"
//! capacity = 16                # most workers of one pool on it (default: no limit)
//!
//! [pools.web]
//! engines = ["h2"]             # spread over these (the container transport must be attach)
//! [pools.web.container]
//! image = "my/worker:1"
//! command = ["python3", "-m", "my_worker"]
//! transport = "attach"
//! ```
//!
//! Every key, its meaning and its default: `docs/configuration.md`, and the annotated example
//! `examples/wharf.toml`.
//!
//! Values:
//! - durations are strings with a unit: `"250ms"`, `"30s"`, `"2m"`, `"1h 30m"` (`humantime`'s
//!   syntax);
//! - sizes are a number of bytes or a string with a unit: `"512MiB"`, `"2GiB"` (binary),
//!   `"500MB"` (decimal);
//! - counts are non-negative integers, and a few (`startup_concurrency`, `max_start_failures`,
//!   `max_calls`, `health.max_missed`, `container.pids_limit`) positive ones;
//! - choices are snake_case strings: `strategy = "one_for_all"`.
//!
//! Unknown keys are errors, so a misspelt key never silently keeps its default.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::marker::PhantomData;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use serde_path_to_error::Segment;
use thiserror::Error;
use toml::de::{DeTable, DeValue};
use wharf_actors::engine::{Engine, TlsFiles};
use wharf_actors::fleet::{FleetEngine, HealthOptions};
use wharf_actors::port::{Channel, ContainerSpec, Mount, ProcessSpec, Transport, WorkerSpec};
use wharf_actors::restart::{Backoff, RestartType, Strategy};
use wharf_actors::worker::HealthCheck;

use crate::config::{PoolBuilder, PoolConfig, SessionEnd};
use crate::error::Error;
use crate::pool::Pool;
use crate::runtime::RuntimeSettings;

/// One problem in a configuration file: where it is and what is wrong.
///
/// Displays as `pools.ml.size: expected a non-negative integer, found -3 at wharf.toml:7`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConfigIssue {
    /// The file, as it was named when loaded.
    pub file: String,
    /// The line (from 1) of the key, or of the nearest enclosing table when the key was left
    /// out (a default that another setting conflicts with); `None` if unknown.
    pub line: Option<usize>,
    /// The key as a dotted path (`pools.ml.backoff.max`); `None` for a syntax error.
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(key) = &self.key {
            write!(f, "{key}: ")?;
        }
        write!(f, "{}", self.message)?;
        match self.line {
            Some(line) => write!(f, " at {}:{line}", self.file),
            None => write!(f, " in {}", self.file),
        }
    }
}

/// Why a configuration file could not be loaded.
#[derive(Debug, Clone, Error)]
#[non_exhaustive]
pub enum ConfigFileError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The file was read but is not a valid configuration: a syntax error, a key of the wrong
    /// type or unknown, or a pool whose settings cannot work together. A syntax or type error
    /// stops the reading, so it comes alone; otherwise there is one issue per invalid pool.
    #[error("{}", display_issues(.issues))]
    Invalid {
        /// Every problem found, pools in the order of their names.
        issues: Vec<ConfigIssue>,
    },
}

fn display_issues(issues: &[ConfigIssue]) -> String {
    issues
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

impl ConfigFileError {
    /// The problems found (none for a file that could not be read).
    pub fn issues(&self) -> &[ConfigIssue] {
        match self {
            ConfigFileError::Invalid { issues } => issues,
            ConfigFileError::Read { .. } => &[],
        }
    }
}

/// A loaded, validated configuration file: named pool configurations and the runtime's
/// settings.
///
/// [`ConfigFile::load`] reads a file; [`ConfigFile::parse`] takes the text:
///
/// ```
/// use std::time::Duration;
/// use wharf::ConfigFile;
///
/// let file = ConfigFile::parse(
///     r#"
///     [runtime]
///     idle_timeout = "10m"
///
///     [pools.ml]
///     size = 2
///     call_timeout = "5s"
///
///     [pools.ml.process]
///     command = ["python3", "-m", "wharf_worker.demo"]
///     "#,
///     "wharf.toml",
/// )?;
/// assert_eq!(file.runtime().idle_timeout, Some(Duration::from_secs(600)));
/// let ml = file.config("ml").expect("a pool named ml");
/// assert_eq!((ml.size, ml.call_timeout), (2, Duration::from_secs(5)));
/// // Start it with `Runtime::from_file(&file)`, or adjust it in code first:
/// let builder = file.builder("ml").unwrap().size(8); // then .build().await
/// assert_eq!(builder.config().size, 8);
///
/// // Every mistake comes with its file, line and key.
/// let err = ConfigFile::parse("[pools.ml]\nsise = 2\n", "wharf.toml").unwrap_err();
/// assert_eq!(
///     err.issues()[0].to_string(),
///     "pools.ml.sise: unknown key `sise` (did you mean `size`?) at wharf.toml:2"
/// );
/// # Ok::<(), wharf::ConfigFileError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigFile {
    origin: String,
    runtime: RuntimeSettings,
    pools: BTreeMap<String, PoolConfig>,
    engines: BTreeMap<String, FleetEngine>,
}

impl ConfigFile {
    /// Reads, parses and validates the file at `path`. Errors name `path` as given.
    pub fn load(path: impl AsRef<Path>) -> Result<ConfigFile, ConfigFileError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigFileError::Read {
            path: path.to_owned(),
            source: Arc::new(e),
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates `text`; `origin` names it in errors (a file name, `<stdin>` ...).
    pub fn parse(text: &str, origin: &str) -> Result<ConfigFile, ConfigFileError> {
        let doc = Document { text, origin };
        let raw: RawFile = match toml::de::Deserializer::parse(text) {
            Ok(de) => serde_path_to_error::deserialize(de).map_err(|e| {
                let path: Vec<Seg> = e.path().iter().filter_map(Seg::from_serde).collect();
                let (message, path) = reword(e.inner().message(), path);
                let line = e
                    .inner()
                    .span()
                    .map(|span| doc.line(span))
                    .or_else(|| doc.line_of_key(&path));
                ConfigFileError::Invalid {
                    issues: vec![doc.issue(&path, line, message)],
                }
            })?,
            Err(e) => {
                let line = e.span().map(|span| doc.line(span));
                return Err(ConfigFileError::Invalid {
                    issues: vec![doc.issue(&[], line, e.message().to_owned())],
                });
            }
        };
        let mut issues = Vec::new();
        let mut engines = BTreeMap::new();
        for (i, raw_engine) in raw.engines.into_iter().enumerate() {
            let at = |key: &str| {
                let mut path = vec![Seg::Key("engines".into()), Seg::Index(i)];
                path.extend((!key.is_empty()).then(|| Seg::Key(key.to_owned())));
                path
            };
            if engines.contains_key(&raw_engine.name) {
                let path = at("name");
                let message = format!("a second engine named {:?}", raw_engine.name);
                issues.push(doc.issue(&path, doc.line_of_key(&path), message));
                continue;
            }
            match raw_engine.into_engine() {
                Ok(engine) => {
                    engines.insert(engine.engine.name().to_owned(), engine);
                }
                Err((key, message)) => {
                    let path = at(&key);
                    issues.push(doc.issue(&path, doc.line_of_key(&path), message));
                }
            }
        }
        let mut pools = BTreeMap::new();
        for (name, raw_pool) in raw.pools {
            match raw_pool.into_config(&name, &engines) {
                Ok(config) => match config.validate() {
                    Ok(()) => {
                        pools.insert(name, config);
                    }
                    Err(Error::Config { field, reason }) => {
                        issues.push(doc.pool_issue(&name, file_key(field), reason));
                    }
                    Err(other) => issues.push(doc.pool_issue(&name, "", other.to_string())),
                },
                Err((key, message)) => issues.push(doc.pool_issue(&name, &key, message)),
            }
        }
        if !issues.is_empty() {
            return Err(ConfigFileError::Invalid { issues });
        }
        Ok(ConfigFile {
            origin: origin.to_owned(),
            runtime: raw.runtime.into(),
            pools,
            engines,
        })
    }

    /// The file's name, as given to [`ConfigFile::load`] or [`ConfigFile::parse`].
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The `[runtime]` table's settings (defaults if there is none).
    pub fn runtime(&self) -> &RuntimeSettings {
        &self.runtime
    }

    /// The pools' names, in alphabetical order.
    pub fn pool_names(&self) -> impl Iterator<Item = &str> {
        self.pools.keys().map(String::as_str)
    }

    /// The configuration of the pool `name` (the table `[pools.NAME]`).
    pub fn config(&self, name: &str) -> Option<&PoolConfig> {
        self.pools.get(name)
    }

    /// Every pool's configuration, by name.
    pub fn configs(&self) -> impl Iterator<Item = &PoolConfig> {
        self.pools.values()
    }

    /// The `[[engines]]` the file lists, by name (not contacted: each may be down now).
    pub fn engines(&self) -> impl Iterator<Item = &FleetEngine> {
        self.engines.values()
    }

    /// A builder for the pool `name`, to adjust in code before [`PoolBuilder::build`].
    pub fn builder(&self, name: &str) -> Option<PoolBuilder> {
        self.pools.get(name).cloned().map(PoolBuilder::from)
    }
}

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

impl Seg {
    fn from_serde(s: &Segment) -> Option<Seg> {
        match s {
            Segment::Map { key } => Some(Seg::Key(key.clone())),
            Segment::Seq { index } => Some(Seg::Index(*index)),
            Segment::Enum { .. } | Segment::Unknown => None,
        }
    }
}

/// A key path as written in TOML: `pools.ml.container.mounts[0].source`; keys that are not
/// bare are quoted.
fn display_path(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(key) => {
                if !out.is_empty() {
                    out.push('.');
                }
                let bare = !key.is_empty()
                    && key
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                if bare {
                    out.push_str(key);
                } else {
                    out.push_str(&format!("{key:?}"));
                }
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// Makes serde's wording speak of keys, and points an unknown key at itself.
fn reword(message: &str, path: Vec<Seg>) -> (String, Vec<Seg>) {
    if let Some(rest) = message.strip_prefix("missing field `") {
        return (format!("missing key `{rest}"), path);
    }
    let Some(rest) = message.strip_prefix("unknown field `") else {
        return (message.replace("expected a map", "expected a table"), path);
    };
    let Some((key, expected)) = rest.split_once('`') else {
        return (message.to_owned(), path);
    };
    let mut text = format!("unknown key `{key}`");
    let known: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    if let Some(near) = known.iter().find(|k| edit_distance(k, key) <= 2) {
        text.push_str(&format!(" (did you mean `{near}`?)"));
    } else if !known.is_empty() {
        text.push_str(&format!("; known keys here: {}", known.join(", ")));
    }
    let mut path = path;
    if path.last() != Some(&Seg::Key(key.to_owned())) {
        path.push(Seg::Key(key.to_owned()));
    }
    (text, path)
}

/// Levenshtein distance, for suggesting the key that was meant.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// The key in the file of a field named by [`PoolConfig::validate`], relative to the pool's
/// table.
fn file_key(field: &str) -> &str {
    match field {
        "spec.program" => "process.command",
        "spec.image" => "container.image",
        "spec.command" => "container.command",
        "name" => "",
        other => other,
    }
}

/// The text being read, to place issues in it.
struct Document<'a> {
    text: &'a str,
    origin: &'a str,
}

impl Document<'_> {
    /// The line (from 1) at which `span` starts.
    fn line(&self, span: Range<usize>) -> usize {
        let start = span.start.min(self.text.len());
        self.text.as_bytes()[..start]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1
    }

    /// The line of the deepest part of `path` that the file spells out.
    fn line_of_key(&self, path: &[Seg]) -> Option<usize> {
        let root = DeTable::parse(self.text).ok()?;
        key_span(root.get_ref(), path).map(|span| self.line(span))
    }

    fn issue(&self, path: &[Seg], line: Option<usize>, message: String) -> ConfigIssue {
        ConfigIssue {
            file: self.origin.to_owned(),
            line,
            key: (!path.is_empty()).then(|| display_path(path)),
            message,
        }
    }

    /// An issue with `key` (dotted, relative to `[pools.NAME]`; empty for the table itself).
    fn pool_issue(&self, pool: &str, key: &str, message: String) -> ConfigIssue {
        let mut path = vec![Seg::Key("pools".into()), Seg::Key(pool.to_owned())];
        path.extend(
            key.split('.')
                .filter(|k| !k.is_empty())
                .map(|k| Seg::Key(k.to_owned())),
        );
        self.issue(&path, self.line_of_key(&path), message)
    }
}

/// The span of the deepest key (or array element) of `path` present in `table`.
fn key_span(table: &DeTable<'_>, path: &[Seg]) -> Option<Range<usize>> {
    let (Seg::Key(first), rest) = path.split_first()? else {
        return None;
    };
    let (key, value) = table.iter().find(|(k, _)| k.get_ref() == first)?;
    Some(value_span(value.get_ref(), rest).unwrap_or_else(|| key.span()))
}

fn value_span(value: &DeValue<'_>, path: &[Seg]) -> Option<Range<usize>> {
    match (value, path.first()?) {
        (DeValue::Table(t), Seg::Key(_)) => key_span(t, path),
        (DeValue::Array(a), Seg::Index(i)) => {
            let item = a.get(*i)?;
            Some(value_span(item.get_ref(), &path[1..]).unwrap_or_else(|| item.span()))
        }
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// The file as serde reads it. Every field is optional where the builder has a default; the
// values are applied to a `PoolBuilder`, so a key left out keeps the builder's default.

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
struct RawFile {
    #[serde(default)]
    runtime: RawRuntime,
    #[serde(default)]
    pools: BTreeMap<String, RawPool>,
    #[serde(default)]
    engines: Vec<RawEngine>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
struct RawEngine {
    name: String,
    host: String,
    tls_ca: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    capacity: Option<Positive<usize>>,
    startup_concurrency: Option<Positive<usize>>,
    request_timeout: Option<Dur>,
}

impl RawEngine {
    /// The engine (not contacted: it may be down now), or the key that is wrong and why.
    fn into_engine(self) -> Result<FleetEngine, ApplyError> {
        if self.name.is_empty() {
            return Err(("name".into(), "must not be empty".into()));
        }
        let tls = match (self.tls_ca, self.tls_cert, self.tls_key) {
            (Some(ca), Some(cert), Some(key)) => Some(TlsFiles { ca, cert, key }),
            (None, None, None) => None,
            _ => {
                return Err((
                    "tls_ca".into(),
                    "tls_ca, tls_cert and tls_key go together: give all three or none".into(),
                ))
            }
        };
        let timeout = self
            .request_timeout
            .map_or(Duration::from_secs(30), |d| d.0);
        let engine = Engine::at(&self.name, &self.host, tls.as_ref(), timeout)
            .map_err(|e| ("host".to_owned(), e.to_string()))?;
        Ok(FleetEngine {
            engine,
            capacity: self.capacity.map(|c| c.0),
            startup_concurrency: self.startup_concurrency.map(|c| c.0),
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
struct RawEngineHealth {
    interval: Option<Dur>,
    timeout: Option<Dur>,
    down_after: Option<Positive<u32>>,
    max_backoff: Option<Dur>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, expecting = "a table")]
struct RawRuntime {
    idle_timeout: Option<Dur>,
}

impl From<RawRuntime> for RuntimeSettings {
    fn from(raw: RawRuntime) -> Self {
        RuntimeSettings {
            idle_timeout: raw.idle_timeout.map(|d| d.0),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
struct RawPool {
    process: Option<RawProcess>,
    container: Option<RawContainer>,
    size: Option<Count<usize>>,
    max_overflow: Option<Count<usize>>,
    overflow_idle_timeout: Option<Dur>,
    lazy: Option<bool>,
    startup_concurrency: Option<Positive<usize>>,
    init_timeout: Option<Dur>,
    call_timeout: Option<Dur>,
    checkout_timeout: Option<Dur>,
    max_waiting: Option<Count<usize>>,
    strategy: Option<RawStrategy>,
    restart_type: Option<RawRestartType>,
    intensity: Option<RawIntensity>,
    max_start_failures: Option<Positive<u32>>,
    backoff: Option<RawBackoff>,
    health: Option<RawHealth>,
    max_calls: Option<Positive<u64>>,
    max_lifetime: Option<Dur>,
    recycle_jitter: Option<f64>,
    max_rss: Option<Bytes>,
    sample_interval: Option<Dur>,
    max_frame: Option<Bytes>,
    session_end: Option<RawSessionEnd>,
    session_idle_timeout: Option<Dur>,
    shutdown_grace: Option<Dur>,
    drain_timeout: Option<Dur>,
    session_reset_timeout: Option<Dur>,
    retry: Option<RawRetry>,
    engines: Option<Vec<String>>,
    engine_health: Option<RawEngineHealth>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
struct RawIntensity {
    max_restarts: Option<Count<u32>>,
    within: Option<Dur>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
struct RawBackoff {
    initial: Option<Dur>,
    max: Option<Dur>,
    multiplier: Option<f64>,
    jitter: Option<f64>,
    reset_after: Option<Dur>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
struct RawHealth {
    enabled: Option<bool>,
    interval: Option<Dur>,
    timeout: Option<Dur>,
    max_missed: Option<Positive<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
struct RawRetry {
    max_retries: Option<Count<u32>>,
    delay: Option<Dur>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
struct RawProcess {
    command: Argv,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    inherit_env: Option<Vec<String>>,
    cwd: Option<PathBuf>,
    channel: Option<RawChannel>,
    require_watchdog: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
struct RawContainer {
    image: String,
    command: Argv,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    transport: Option<RawTransport>,
    #[serde(default)]
    mounts: Vec<RawMount>,
    tmpfs: Option<BTreeMap<String, String>>,
    network: Option<String>,
    read_only_rootfs: Option<bool>,
    drop_capabilities: Option<bool>,
    no_new_privileges: Option<bool>,
    init: Option<bool>,
    user: Option<String>,
    workdir: Option<String>,
    memory: Option<Bytes>,
    cpus: Option<f64>,
    pids_limit: Option<Positive<i64>>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
struct RawMount {
    source: PathBuf,
    target: PathBuf,
    #[serde(default)]
    read_only: bool,
}

/// A choice written as a snake_case string, mirroring one of the runtime's enums.
macro_rules! choice {
    ($raw:ident => $real:ty { $($variant:ident),+ $(,)? }) => {
        #[derive(Deserialize, Clone, Copy)]
        #[serde(rename_all = "snake_case")]
        enum $raw {
            $($variant),+
        }

        impl From<$raw> for $real {
            fn from(v: $raw) -> Self {
                match v {
                    $($raw::$variant => <$real>::$variant),+
                }
            }
        }
    };
}

choice!(RawStrategy => Strategy { OneForOne, OneForAll, RestForOne });
choice!(RawRestartType => RestartType { Permanent, Transient, Temporary });
choice!(RawSessionEnd => SessionEnd { Reset, Recycle });
choice!(RawChannel => Channel { Fds, Stdio });
choice!(RawTransport => Transport { Fifo, Socket, Attach });

/// A problem found while applying a pool's table: the key (relative to the pool) and what is
/// wrong with it.
type ApplyError = (String, String);

impl RawPool {
    /// The pool's configuration: the builder's defaults with this table's keys applied.
    fn into_config(
        self,
        name: &str,
        engines: &BTreeMap<String, FleetEngine>,
    ) -> Result<PoolConfig, ApplyError> {
        let spec: WorkerSpec = match (self.process, self.container) {
            (Some(p), None) => p.into_spec().into(),
            (None, Some(c)) => c.into_spec()?.into(),
            (Some(_), Some(_)) => {
                return Err((
                    "container".into(),
                    "a pool runs processes or containers, not both: keep one of \
                     [process] and [container]"
                        .into(),
                ))
            }
            (None, None) => {
                return Err((
                    String::new(),
                    "says nothing to run: add a [process] or a [container] table".into(),
                ))
            }
        };
        let mut b = Pool::builder(spec).name(name);
        macro_rules! set {
            ($($field:ident => $method:ident),+ $(,)?) => {
                $(if let Some(v) = self.$field {
                    b = b.$method(v.into());
                })+
            };
        }
        set!(
            size => size,
            max_overflow => max_overflow,
            overflow_idle_timeout => overflow_idle_timeout,
            startup_concurrency => startup_concurrency,
            init_timeout => init_timeout,
            call_timeout => call_timeout,
            checkout_timeout => checkout_timeout,
            max_waiting => max_waiting,
            strategy => strategy,
            restart_type => restart_type,
            max_start_failures => max_start_failures,
            max_calls => max_calls,
            max_lifetime => max_lifetime,
            recycle_jitter => recycle_jitter,
            max_rss => max_rss,
            sample_interval => sample_interval,
            session_end => session_end,
            session_idle_timeout => session_idle_timeout,
            shutdown_grace => shutdown_grace,
            drain_timeout => drain_timeout,
            session_reset_timeout => session_reset_timeout,
        );
        if let Some(max_frame) = self.max_frame {
            let bytes = usize::try_from(max_frame.0).map_err(|_| {
                (
                    "max_frame".to_owned(),
                    format!("{} is too large", max_frame.0),
                )
            })?;
            b = b.max_frame(bytes);
        }
        if self.lazy == Some(true) {
            b = b.lazy();
        }
        let defaults = b.config().clone();
        if let Some(i) = self.intensity {
            let d = defaults.restart.intensity;
            b = b.intensity(
                i.max_restarts.map_or(d.max_restarts, |n| n.0),
                i.within.map_or(d.within, |w| w.0),
            );
        }
        if let Some(r) = self.backoff {
            let d = defaults.restart.backoff;
            b = b.backoff(Backoff {
                initial: r.initial.map_or(d.initial, |v| v.0),
                max: r.max.map_or(d.max, |v| v.0),
                multiplier: r.multiplier.unwrap_or(d.multiplier),
                jitter: r.jitter.unwrap_or(d.jitter),
                reset_after: r.reset_after.map_or(d.reset_after, |v| v.0),
            });
        }
        if let Some(h) = self.health {
            let d = defaults.health;
            let interval = h.interval.map_or(d.interval, |v| Some(v.0));
            b = b.health_check(HealthCheck {
                interval: if h.enabled == Some(false) {
                    None
                } else {
                    interval
                },
                timeout: h.timeout.map_or(d.timeout, |v| v.0),
                max_missed: h.max_missed.map_or(d.max_missed, |v| v.0),
            });
        }
        if let Some(r) = self.retry {
            let d = defaults.retry;
            b = b.retry(
                r.max_retries.map_or(d.max_retries, |v| v.0),
                r.delay.map_or(d.delay, |v| v.0),
            );
        }
        for engine in self.engines.unwrap_or_default() {
            let Some(found) = engines.get(&engine) else {
                let known: Vec<&str> = engines.keys().map(String::as_str).collect();
                return Err((
                    "engines".into(),
                    format!("no [[engines]] entry is named {engine:?} (known: {known:?})"),
                ));
            };
            b = b.engine(found.clone());
        }
        if let Some(h) = self.engine_health {
            let d = HealthOptions::default();
            b = b.engine_health(HealthOptions {
                interval: h.interval.map_or(d.interval, |v| v.0),
                timeout: h.timeout.map_or(d.timeout, |v| v.0),
                down_after: h.down_after.map_or(d.down_after, |v| v.0),
                max_backoff: h.max_backoff.map_or(d.max_backoff, |v| v.0),
            });
        }
        Ok(b.into_config())
    }
}

impl RawProcess {
    fn into_spec(self) -> ProcessSpec {
        let mut argv = self.command.0;
        argv.extend(self.args);
        let mut spec = ProcessSpec::from_argv(argv).unwrap_or_else(|| ProcessSpec::new(""));
        if let Some(names) = self.inherit_env {
            spec.env = names
                .into_iter()
                .filter_map(|k| std::env::var_os(&k).map(|v| (OsString::from(k), v)))
                .collect();
        }
        for (k, v) in self.env {
            spec = spec.env(k, v);
        }
        spec.cwd = self.cwd;
        if let Some(c) = self.channel {
            spec = spec.channel(c.into());
        }
        if let Some(w) = self.require_watchdog {
            spec = spec.require_watchdog(w);
        }
        spec
    }
}

impl RawContainer {
    fn into_spec(self) -> Result<ContainerSpec, ApplyError> {
        let mut command = self.command.0;
        command.extend(self.args);
        let mut spec = ContainerSpec::new(self.image, command);
        for (k, v) in self.env {
            spec = spec.env(k, v);
        }
        if let Some(t) = self.transport {
            spec = spec.transport(t.into());
        }
        spec.mounts = self
            .mounts
            .into_iter()
            .map(|m| Mount {
                source: m.source,
                target: m.target,
                read_only: m.read_only,
            })
            .collect();
        if let Some(tmpfs) = self.tmpfs {
            spec.tmpfs = tmpfs.into_iter().collect();
        }
        if let Some(network) = self.network {
            spec = spec.network(network);
        }
        macro_rules! flag {
            ($($field:ident),+) => {
                $(if let Some(v) = self.$field {
                    spec.$field = v;
                })+
            };
        }
        flag!(read_only_rootfs, drop_capabilities, no_new_privileges, init);
        if let Some(user) = self.user {
            // An empty user: the image's own.
            spec.user = (!user.is_empty()).then_some(user);
        }
        spec.workdir = self.workdir;
        spec.memory = self.memory.map(|m| m.0);
        if let Some(cpus) = self.cpus {
            if !(cpus.is_finite() && cpus > 0.0) {
                return Err((
                    "container.cpus".into(),
                    format!("expected a positive number of CPUs, found {cpus}"),
                ));
            }
            spec = spec.cpus(cpus);
        }
        spec.pids_limit = self.pids_limit.map(|n| n.0);
        spec.labels = self.labels.into_iter().collect();
        Ok(spec)
    }
}

// ---------------------------------------------------------------------------------------------
// Values with their own syntax.

/// A duration written with its unit: `"250ms"`, `"30s"`, `"2m"`, `"1h 30m"`.
#[derive(Debug, Clone, Copy)]
struct Dur(Duration);

impl From<Dur> for Duration {
    fn from(d: Dur) -> Duration {
        d.0
    }
}

const DURATION_EXAMPLES: &str = "a duration such as \"250ms\", \"30s\" or \"2m\"";

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(DURATION_EXAMPLES)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Dur, E> {
                humantime::parse_duration(s).map(Dur).map_err(|e| {
                    E::custom(format!("expected {DURATION_EXAMPLES}, found {s:?}: {e}"))
                })
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Dur, E> {
                Err(E::custom(format!(
                    "expected a duration with its unit, such as \"{n}s\" or \"{n}ms\", found {n}"
                )))
            }
        }
        d.deserialize_any(V)
    }
}

/// A size: a number of bytes, or a string with a unit (`"512MiB"`, `"2GB"`).
#[derive(Debug, Clone, Copy)]
struct Bytes(u64);

impl From<Bytes> for u64 {
    fn from(b: Bytes) -> u64 {
        b.0
    }
}

const SIZE_EXAMPLES: &str = "a size in bytes, or with a unit such as \"512MiB\" or \"2GB\"";

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Bytes;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(SIZE_EXAMPLES)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Bytes, E> {
                s.trim()
                    .parse::<bytesize::ByteSize>()
                    .map(|b| Bytes(b.as_u64()))
                    .map_err(|_| E::custom(format!("expected {SIZE_EXAMPLES}, found {s:?}")))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Bytes, E> {
                u64::try_from(n)
                    .map(Bytes)
                    .map_err(|_| E::custom(format!("expected {SIZE_EXAMPLES}, found {n}")))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Bytes, E> {
                Ok(Bytes(n))
            }
        }
        d.deserialize_any(V)
    }
}

/// An integer of at least `MIN` that fits `T`.
#[derive(Debug, Clone, Copy)]
struct Int<T, const MIN: i64>(T);

/// A non-negative integer.
type Count<T> = Int<T, 0>;
/// A positive integer.
type Positive<T> = Int<T, 1>;

impl<T, const MIN: i64> Int<T, MIN> {
    fn expected() -> String {
        match MIN {
            0 => "a non-negative integer".into(),
            1 => "a positive integer".into(),
            n => format!("an integer of at least {n}"),
        }
    }
}

macro_rules! int_into {
    ($($t:ty),+) => {
        $(impl<const MIN: i64> From<Int<$t, MIN>> for $t {
            fn from(v: Int<$t, MIN>) -> $t {
                v.0
            }
        })+
    };
}
int_into!(usize, u32, u64, i64);

impl<'de, T: TryFrom<i64>, const MIN: i64> Deserialize<'de> for Int<T, MIN> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T, const MIN: i64>(PhantomData<T>);
        impl<T: TryFrom<i64>, const MIN: i64> Visitor<'_> for V<T, MIN> {
            type Value = Int<T, MIN>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&Int::<T, MIN>::expected())
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Self::Value, E> {
                if n < MIN {
                    return Err(E::custom(format!(
                        "expected {}, found {n}",
                        Int::<T, MIN>::expected()
                    )));
                }
                T::try_from(n)
                    .map(Int)
                    .map_err(|_| E::custom(format!("{n} is too large")))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Self::Value, E> {
                match i64::try_from(n) {
                    Ok(n) => self.visit_i64(n),
                    Err(_) => Err(E::custom(format!("{n} is too large"))),
                }
            }
        }
        d.deserialize_i64(V::<T, MIN>(PhantomData))
    }
}

/// A command: a program name alone, or a list of the program and its arguments.
#[derive(Debug, Clone)]
struct Argv(Vec<String>);

impl<'de> Deserialize<'de> for Argv {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Argv;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a program, or a list of the program and its arguments")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Argv, E> {
                Ok(Argv(vec![s.to_owned()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Argv, A::Error> {
                let mut argv = Vec::new();
                while let Some(arg) = seq.next_element::<String>()? {
                    argv.push(arg);
                }
                Ok(Argv(argv))
            }
        }
        d.deserialize_any(V)
    }
}
