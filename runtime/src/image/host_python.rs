//! The host-Python image: the skeleton root filesystem, and the read-only mounts of the host's
//! `/usr`, Python prefix and `wharf_worker` package that a container of it needs.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use wharf_actors::engine::Engine;
use wharf_actors::port::ContainerSpec;

use super::import::Import;
use super::rootfs::Rootfs;
use super::{run_program, ImageError, Mount, HOST_PYTHON_TAG, WORKER_PACKAGE_TARGET};

/// A host-Python image and what a container of it needs: the image alone holds no Python.
///
/// Run it with every mount in [`mounts`](Self::mounts) (all read-only), the variables in
/// [`env`](Self::env), and [`python`](Self::python) as the entrypoint, e.g.
/// `[python, "-m", "wharf_worker.demo"]` ([`command`](Self::command)). It runs as any user:
/// `65534:65534` (nobody) is the one to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPythonImage {
    /// The image's tag.
    pub image: String,
    /// The image id (`sha256:...`).
    pub id: String,
    /// The Python executable, as seen inside the container (the same path as on the host).
    pub python: PathBuf,
    /// The bind mounts the container needs, all read-only.
    pub mounts: Vec<Mount>,
    /// The environment the container needs (`PYTHONPATH`, ...).
    pub env: Vec<(String, String)>,
    /// The host Python's version (`3.11.7`).
    pub version: String,
    /// Whether an existing image was reused.
    pub reused: bool,
}

impl HostPythonImage {
    /// The container's command: the Python executable, then `args`.
    pub fn command<I, S>(&self, args: I) -> Vec<String>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        std::iter::once(self.python.display().to_string())
            .chain(args.into_iter().map(Into::into))
            .collect()
    }

    /// [`env`](Self::env) in the engine's `KEY=VALUE` form.
    pub fn env_strings(&self) -> Vec<String> {
        self.env.iter().map(|(k, v)| format!("{k}={v}")).collect()
    }

    /// A container worker spec for this image running `python args...` (e.g.
    /// `["-m", "wharf_worker.demo"]`) as nobody (`65534:65534`), with the image's mounts and
    /// environment and the secure defaults of [`ContainerSpec`].
    pub fn spec<I, S>(&self, args: I) -> ContainerSpec
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut spec =
            ContainerSpec::new(self.image.clone(), self.command(args)).user("65534:65534");
        spec.mounts.extend(self.mounts.iter().cloned());
        for (k, v) in &self.env {
            spec = spec.env(k.clone(), v.clone());
        }
        spec
    }
}

/// Options of [`ensure_host_python`].
#[derive(Debug, Clone)]
pub struct HostPythonOptions {
    /// The tag to give the image (default [`HOST_PYTHON_TAG`]).
    pub tag: String,
    /// The Python command to ask for its real prefix (default `python3`; a pyenv shim is fine:
    /// the real prefix is what is mounted).
    pub python: OsString,
    /// The directory holding the `wharf_worker` package (the directory *above*
    /// `wharf_worker/`). `None`: wherever the Python finds it (its own `PYTHONPATH` included);
    /// no extra mount if it is installed under the Python's prefix.
    pub worker_package: Option<PathBuf>,
    /// Extra labels on the image (`key`, `value`), e.g. `("wharf.test", "1")`.
    pub labels: Vec<(String, String)>,
}

impl Default for HostPythonOptions {
    fn default() -> Self {
        HostPythonOptions {
            tag: HOST_PYTHON_TAG.to_owned(),
            python: "python3".into(),
            worker_package: None,
            labels: Vec::new(),
        }
    }
}

/// What the host Python says about itself.
#[derive(Debug, serde::Deserialize)]
struct PythonFacts {
    base_prefix: PathBuf,
    executable: PathBuf,
    version: String,
    msgpack: Option<PathBuf>,
    wharf_worker: Option<PathBuf>,
}

const PYTHON_FACTS: &str = r#"
import json, os, sys
def where(name):
    try:
        module = __import__(name)
    except Exception:
        return None
    return os.path.dirname(os.path.dirname(os.path.realpath(module.__file__)))
exe = getattr(sys, "_base_executable", None) or sys.executable
print(json.dumps({
    "base_prefix": os.path.realpath(sys.base_prefix),
    "executable": os.path.realpath(exe),
    "version": "%d.%d.%d" % sys.version_info[:3],
    "msgpack": where("msgpack"),
    "wharf_worker": where("wharf_worker"),
}))
"#;

async fn python_facts(python: &OsString) -> Result<PythonFacts, ImageError> {
    // Run as a worker would be: PYTHONPATH and the user's site directory count.
    let out = run_program(tokio::process::Command::new(python).args(["-c", PYTHON_FACTS])).await?;
    serde_json::from_slice(&out).map_err(|e| ImageError::Python {
        python: python.to_string_lossy().into_owned(),
        reason: format!("unexpected answer ({e})"),
    })
}

/// Whether `path` is `dir` or below it.
fn under(path: &Path, dir: &Path) -> bool {
    path.starts_with(dir)
}

/// Builds (or reuses) the host-Python image and says how to run it.
///
/// The image is the skeleton root filesystem (no Python in it). Asks `opts.python` for its real
/// prefix (`sys.base_prefix`, so a pyenv shim or a virtualenv leads to the real installation),
/// its executable and where it finds `msgpack` and `wharf_worker`, and returns the read-only
/// mounts that make them visible in a container at the same paths: `/usr`, the prefix (unless
/// under `/usr`), `msgpack`'s directory if it lies outside both, and the `wharf_worker` package
/// directory at [`WORKER_PACKAGE_TARGET`] (unless installed under the prefix), with
/// `PYTHONPATH` set to match. Host directories `/bin`, `/lib`, `/lib64` that are real
/// directories (a host without merged `/usr`) are mounted too.
///
/// The mounts resolve on the engine's host: use a local engine.
///
/// # Errors
///
/// [`ImageError::Python`] if the Python cannot be asked, has no `msgpack`, cannot find
/// `wharf_worker` (and none was given), or its executable lies outside what is mounted;
/// [`ImageError::Engine`] if the import fails.
pub async fn ensure_host_python(
    engine: &Engine,
    opts: &HostPythonOptions,
) -> Result<HostPythonImage, ImageError> {
    let python_name = opts.python.to_string_lossy().into_owned();
    let bad = |reason: String| ImageError::Python {
        python: python_name.clone(),
        reason,
    };
    let facts = python_facts(&opts.python).await?;

    let mut fs = Rootfs::skeleton();
    let mut mounts = vec![Mount::read_only("/usr", "/usr")];
    // A host without merged /usr keeps real /bin, /lib, ...: mount those too.
    for dir in ["bin", "lib", "lib32", "lib64", "libx32"] {
        let host = Path::new("/").join(dir);
        match std::fs::symlink_metadata(&host) {
            Ok(m) if m.is_dir() => {
                fs.dir(dir, 0o755);
                mounts.push(Mount::read_only(&host, &host));
            }
            Ok(m) if m.file_type().is_symlink() && !fs.has(dir) => {
                if let Ok(target) = std::fs::read_link(&host) {
                    if let Some(t) = target.to_str().filter(|t| t.starts_with("usr/")) {
                        fs.symlink(dir, t);
                    }
                }
            }
            _ => {}
        }
    }
    // Whether a host path is visible at the same path in the container.
    let mounted = |p: &Path, mounts: &[Mount]| {
        mounts
            .iter()
            .any(|m| m.source == m.target && under(p, &m.source))
    };
    if !mounted(&facts.base_prefix, &mounts) {
        mounts.push(Mount::read_only(&facts.base_prefix, &facts.base_prefix));
    }
    if !mounted(&facts.executable, &mounts) {
        return Err(bad(format!(
            "its executable {} lies outside /usr and its prefix {}",
            facts.executable.display(),
            facts.base_prefix.display()
        )));
    }
    let mut python_path = Vec::new();
    let worker_package = match &opts.worker_package {
        Some(dir) => {
            if !dir.join("wharf_worker/__init__.py").is_file() {
                return Err(ImageError::Invalid {
                    what: "worker package directory",
                    value: dir.display().to_string(),
                    reason: "it must hold wharf_worker/__init__.py",
                });
            }
            Some(std::fs::canonicalize(dir).map_err(|source| ImageError::Io {
                path: dir.clone(),
                source,
            })?)
        }
        None => match &facts.wharf_worker {
            Some(dir) if mounted(dir, &mounts) => None,
            Some(dir) => Some(dir.clone()),
            None => {
                return Err(bad(
                    "it cannot import wharf_worker: install it, put it on PYTHONPATH, or name \
                     its directory"
                        .to_owned(),
                ))
            }
        },
    };
    if let Some(dir) = worker_package {
        mounts.push(Mount::read_only(dir, WORKER_PACKAGE_TARGET));
        python_path.push(WORKER_PACKAGE_TARGET.to_owned());
    }
    match &facts.msgpack {
        Some(dir) if mounted(dir, &mounts) => {}
        Some(dir) => {
            mounts.push(Mount::read_only(dir, dir));
            python_path.push(dir.display().to_string());
        }
        None => {
            return Err(bad(
                "it cannot import msgpack (wharf_worker needs it): pip install msgpack".to_owned(),
            ))
        }
    }
    fs.dir(&WORKER_PACKAGE_TARGET[1..], 0o755);

    let import = Import {
        tag: opts.tag.clone(),
        kind: "host-python",
        changes: Vec::new(),
        labels: opts.labels.clone(),
    };
    let built = import.tree(engine, &fs).await?;
    let mut env = vec![("PYTHONDONTWRITEBYTECODE".to_owned(), "1".to_owned())];
    if !python_path.is_empty() {
        env.push(("PYTHONPATH".to_owned(), python_path.join(":")));
    }
    Ok(HostPythonImage {
        image: built.tag,
        id: built.id,
        python: facts.executable,
        mounts,
        env,
        version: facts.version,
        reused: built.reused,
    })
}
