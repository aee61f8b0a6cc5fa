//! Worker images without a registry: root filesystems built here and imported into the engine.
//!
//! This module owns every image wharf makes. An engine that cannot pull still has its import
//! API (`POST /images/create?fromSrc=-`, what `docker import` calls): this module writes a root
//! filesystem as a tar stream, imports it with labels, tags it and checks the tag names the
//! imported image. No Dockerfile, no build context, no network. Three kinds:
//!
//! - **host Python** ([`ensure_host_python`]): a near-empty root filesystem (~130 bytes of files)
//!   plus the read-only bind mounts a container of it needs at run time: the host's `/usr`, the
//!   host Python's real prefix and the `wharf_worker` package. The image works only on an engine
//!   that shares this host's filesystem (a local engine). Builds in a fraction of a second.
//! - **static binary** ([`ensure_static_binary`]): the same skeleton plus one statically linked
//!   executable (a Rust worker built with `-C target-feature=+crt-static`), as its entrypoint.
//!   Self-contained: runs on any engine of the same architecture.
//! - **Debian Python** ([`ensure_debian_python`]): a self-contained image with its own Python,
//!   made by `debootstrap` from Debian's packages, with `wharf_worker` copied in, as a user's
//!   image would be. Takes about a minute and root privileges.
//!
//! How to build and run each kind, what they cost and the pitfalls in full: `docs/containers.md`.
//!
//! # Example
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use wharf::image::{self, HostPythonOptions, StaticBinaryOptions};
//!
//! let engine = wharf::Engine::local(Duration::from_secs(10)).await?;
//!
//! // No Python in the image: run it with these mounts, this environment and entrypoint.
//! let py = image::ensure_host_python(&engine, &HostPythonOptions::default()).await?;
//! let binds: Vec<String> = py.mounts.iter().map(|m| m.bind()).collect(); // "src:dst:ro"
//! let entrypoint = py.command(["-m", "wharf_worker.demo"]); // [python, "-m", ...]
//! let env = py.env_strings(); // ["PYTHONPATH=/opt/wharf/python", ...]
//!
//! // A static Rust worker: the image's entrypoint, no mounts.
//! let worker = StaticBinaryOptions::new("target/x86_64-unknown-linux-gnu/release/my-worker");
//! let img = image::ensure_static_binary(&engine, &worker).await?;
//! println!("{} {} {:?} {:?} {:?}", img.image, img.id, binds, entrypoint, env);
//! # Ok(()) }
//! ```
//!
//! # Guarantees
//!
//! - **Idempotent.** Every image carries the label [`LABEL_CONTENT`], a SHA-256 of what went
//!   into it (the root filesystem and the image settings; for Debian, the recipe and the worker
//!   package's files). `ensure_*` reuses an image whose tag already carries the same content hash
//!   and imports nothing; otherwise it imports, retags, and removes the image the tag named
//!   before if nothing else uses it.
//! - **Labelled.** [`LABEL_KIND`] says which kind an image is; [`list`] finds wharf's images
//!   and [`prune`] removes the untagged ones nothing uses.
//! - **Checked.** After an import the tag is inspected: it must name the imported image (or,
//!   when two builders raced, an image with the same content hash).
//!
//! # Pitfalls this module avoids
//!
//! - `/sbin` is a real directory, never a symlink into `/usr`: with `init: true` the engine
//!   mounts its init at `/sbin/docker-init`, which fails (`no such file`) when `/sbin` points into
//!   a read-only `/usr` bind mount.
//! - `/root` is `0755`, so a non-root worker can reach a bind mount below it (a pyenv Python
//!   lives in `~/.pyenv`).
//! - The host Python's *real* prefix (`sys.base_prefix`) is mounted, not the directory of a
//!   version-manager shim, and the entrypoint is the real executable.
//! - A "static" binary with a program interpreter (`PT_INTERP`) is refused: it would fail in an
//!   empty root filesystem with a baffling `no such file or directory`.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;

use bollard::models::CreateImageInfo;
use bollard::query_parameters::{
    CreateImageOptions, CreateImageOptionsBuilder, ListImagesOptionsBuilder,
    RemoveImageOptionsBuilder,
};
use bytes::Bytes;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use thiserror::Error;
use wharf_actors::engine::{Engine, EngineError};

/// Label naming the kind of a wharf image: `host-python`, `static` or `debian-python`.
pub const LABEL_KIND: &str = "wharf.image";
/// Label holding the SHA-256 (hex) of everything that went into a wharf image.
pub const LABEL_CONTENT: &str = "wharf.content";

/// Default tag of [`ensure_host_python`]'s image.
pub const HOST_PYTHON_TAG: &str = "wharf/host-python:latest";
/// Default tag of [`ensure_debian_python`]'s image.
pub const DEBIAN_PYTHON_TAG: &str = "wharf/debian-python:bookworm";
/// Where the `wharf_worker` package directory is mounted in a host-Python container, and
/// where `PYTHONPATH` points.
pub const WORKER_PACKAGE_TARGET: &str = "/opt/wharf/python";

/// Why an image could not be built or found.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ImageError {
    /// The engine refused a request or could not be reached.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// A helper program (`python3`, `debootstrap`) could not be started.
    #[error("cannot run {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A helper program ran and failed.
    #[error("{program} failed ({status}): {stderr}")]
    Command {
        /// The program.
        program: String,
        /// Its exit status.
        status: String,
        /// The end of its standard error.
        stderr: String,
    },
    /// The host Python cannot serve a container (missing module, executable outside the
    /// mounted directories, ...).
    #[error("host Python {python}: {reason}")]
    Python {
        /// The Python command asked.
        python: String,
        /// What is wrong; what to do.
        reason: String,
    },
    /// A file could not be read or the root filesystem could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The binary for a static image has a program interpreter or is not an ELF executable.
    #[error("{path} is not a static executable: {reason}; build it with RUSTFLAGS=\"-C target-feature=+crt-static\" and an explicit --target")]
    NotStatic {
        /// The binary.
        path: PathBuf,
        /// What was found.
        reason: String,
    },
    /// An argument does not fit (a tag, a label, a path inside the image).
    #[error("invalid {what} {value:?}: {reason}")]
    Invalid {
        /// What kind of value.
        what: &'static str,
        /// The value.
        value: String,
        /// What is expected.
        reason: &'static str,
    },
    /// After an import, the tag names a different image with different content.
    #[error("imported {imported} as {tag}, but {tag} names {found}")]
    Mismatch {
        /// The tag.
        tag: String,
        /// The id the import reported.
        imported: String,
        /// The id the tag resolves to.
        found: String,
    },
}

use wharf_actors::port::ContainerSpec;
pub use wharf_actors::port::Mount;

/// An image in the engine, built or found by this module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltImage {
    /// The tag (`repository:tag`).
    pub tag: String,
    /// The image id (`sha256:...`), checked by inspecting the tag.
    pub id: String,
    /// The content hash (the [`LABEL_CONTENT`] label).
    pub content: String,
    /// Whether an existing image was reused (nothing was imported).
    pub reused: bool,
}

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

/// A static-binary image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticBinaryImage {
    /// The image's tag.
    pub image: String,
    /// The image id (`sha256:...`).
    pub id: String,
    /// Where the binary is in the image; also the image's entrypoint.
    pub entrypoint: PathBuf,
    /// Whether an existing image was reused.
    pub reused: bool,
}

/// Options of [`ensure_static_binary`].
#[derive(Debug, Clone)]
pub struct StaticBinaryOptions {
    /// The statically linked executable on this host.
    pub binary: PathBuf,
    /// Where to put it in the image (default `/usr/local/bin/<file name>`).
    pub path_in_image: Option<PathBuf>,
    /// The tag (default `wharf/<file name>:latest`).
    pub tag: Option<String>,
    /// Extra labels on the image.
    pub labels: Vec<(String, String)>,
}

impl StaticBinaryOptions {
    /// Options for `binary` with every default.
    pub fn new(binary: impl Into<PathBuf>) -> StaticBinaryOptions {
        StaticBinaryOptions {
            binary: binary.into(),
            path_in_image: None,
            tag: None,
            labels: Vec::new(),
        }
    }
}

/// Options of [`ensure_debian_python`].
#[derive(Debug, Clone)]
pub struct DebianPythonOptions {
    /// The tag (default [`DEBIAN_PYTHON_TAG`]).
    pub tag: String,
    /// The Debian suite (default `bookworm`).
    pub suite: String,
    /// The mirror; `None` lets debootstrap choose its default.
    pub mirror: Option<String>,
    /// Packages on top of the `minbase` variant (default `python3-minimal`, `python3-msgpack`).
    pub packages: Vec<String>,
    /// The directory holding the `wharf_worker` package (the directory above `wharf_worker/`);
    /// it is copied into the image's `/usr/lib/python3/dist-packages`.
    pub worker_package: PathBuf,
    /// A directory for the temporary root filesystem (default: the system's temp directory).
    /// It needs ~200 MB and must allow device nodes and `chroot`.
    pub work_dir: Option<PathBuf>,
    /// Extra labels on the image.
    pub labels: Vec<(String, String)>,
}

impl DebianPythonOptions {
    /// Options with every default, copying `wharf_worker` from `worker_package`.
    pub fn new(worker_package: impl Into<PathBuf>) -> DebianPythonOptions {
        DebianPythonOptions {
            tag: DEBIAN_PYTHON_TAG.to_owned(),
            suite: "bookworm".to_owned(),
            mirror: None,
            packages: vec!["python3-minimal".to_owned(), "python3-msgpack".to_owned()],
            worker_package: worker_package.into(),
            work_dir: None,
            labels: Vec::new(),
        }
    }
}

/// One wharf image as [`list`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// The image id.
    pub id: String,
    /// Its tags (`repository:tag`).
    pub tags: Vec<String>,
    /// Its [`LABEL_KIND`].
    pub kind: String,
    /// Its [`LABEL_CONTENT`].
    pub content: String,
    /// Its size in bytes.
    pub size: i64,
    /// When it was created, in seconds since the Unix epoch.
    pub created: i64,
}

// ---------------------------------------------------------------------------------------------
// The root filesystem.

/// A file tree to be written as a tar stream: deterministic (sorted, root-owned, mtime 0), so
/// the same tree always hashes the same.
#[derive(Debug, Clone, Default)]
struct Rootfs {
    nodes: BTreeMap<String, Node>,
}

#[derive(Debug, Clone)]
enum Node {
    Dir { mode: u32 },
    File { mode: u32, data: Vec<u8> },
    Symlink { target: String },
}

impl Rootfs {
    /// The skeleton every wharf image shares. `/sbin` is a real directory (the engine's init is
    /// mounted there), `/tmp` is 1777, `/root` 0755; `bin`, `lib` and `lib64` point into `usr`.
    fn skeleton() -> Rootfs {
        let mut fs = Rootfs::default();
        for dir in [
            "dev", "etc", "opt", "proc", "root", "run", "sbin", "sys", "usr",
        ] {
            fs.dir(dir, 0o755);
        }
        fs.dir("tmp", 0o1777);
        for (link, target) in [
            ("bin", "usr/bin"),
            ("lib", "usr/lib"),
            ("lib64", "usr/lib64"),
        ] {
            fs.symlink(link, target);
        }
        fs.file(
            "etc/passwd",
            0o644,
            b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
                .to_vec(),
        );
        fs.file(
            "etc/group",
            0o644,
            b"root:x:0:\nnogroup:x:65534:\n".to_vec(),
        );
        fs
    }

    fn dir(&mut self, path: &str, mode: u32) {
        self.parents(path);
        self.nodes.insert(path.to_owned(), Node::Dir { mode });
    }

    fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) {
        self.parents(path);
        self.nodes
            .insert(path.to_owned(), Node::File { mode, data });
    }

    fn symlink(&mut self, path: &str, target: &str) {
        self.parents(path);
        self.nodes.insert(
            path.to_owned(),
            Node::Symlink {
                target: target.to_owned(),
            },
        );
    }

    /// Makes every missing parent directory of `path` (0755).
    fn parents(&mut self, path: &str) {
        let mut end = 0;
        while let Some(i) = path[end..].find('/') {
            let parent = &path[..end + i];
            self.nodes
                .entry(parent.to_owned())
                .or_insert(Node::Dir { mode: 0o755 });
            end += i + 1;
        }
    }

    /// The tree as an uncompressed tar stream. Parents sort before their children.
    fn to_tar(&self) -> std::io::Result<Vec<u8>> {
        let mut tar = tar::Builder::new(Vec::new());
        for (path, node) in &self.nodes {
            let mut header = tar::Header::new_gnu();
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(0);
            match node {
                Node::Dir { mode } => {
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_mode(*mode);
                    header.set_size(0);
                    tar.append_data(&mut header, format!("{path}/"), std::io::empty())?;
                }
                Node::File { mode, data } => {
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_mode(*mode);
                    header.set_size(data.len() as u64);
                    tar.append_data(&mut header, path, data.as_slice())?;
                }
                Node::Symlink { target } => {
                    header.set_entry_type(tar::EntryType::Symlink);
                    header.set_mode(0o777);
                    header.set_size(0);
                    tar.append_link(&mut header, path, target)?;
                }
            }
        }
        tar.into_inner()
    }
}

/// A path inside an image, checked (absolute, plain components) and made relative (`usr/x`).
fn image_path(path: &Path) -> Result<String, ImageError> {
    let invalid = |reason| ImageError::Invalid {
        what: "path in the image",
        value: path.display().to_string(),
        reason,
    };
    if !path.is_absolute() {
        return Err(invalid("it must be absolute"));
    }
    let mut parts = Vec::new();
    for c in path.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(p) => parts.push(
                p.to_str()
                    .filter(|s| s.chars().all(|c| c.is_ascii_graphic() && c != '"'))
                    .ok_or_else(|| invalid("it must be printable ASCII without quotes"))?,
            ),
            _ => return Err(invalid("it must not hold `.` or `..`")),
        }
    }
    if parts.is_empty() {
        return Err(invalid("it must name a file"));
    }
    Ok(parts.join("/"))
}

// ---------------------------------------------------------------------------------------------
// Importing.

/// What to import: a tar stream, the image settings (Dockerfile instructions the import API
/// accepts), and the hash that identifies them.
struct Import {
    tag: String,
    kind: &'static str,
    changes: Vec<String>,
    labels: Vec<(String, String)>,
}

fn check_label(key: &str, value: &str) -> Result<(), ImageError> {
    let ok = |s: &str, extra: &str| {
        s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-/:".contains(c) || extra.contains(c))
    };
    if key.is_empty() || !ok(key, "") {
        return Err(ImageError::Invalid {
            what: "label key",
            value: key.to_owned(),
            reason: "use letters, digits and . _ - / :",
        });
    }
    if !ok(value, "=,+@") {
        return Err(ImageError::Invalid {
            what: "label value",
            value: value.to_owned(),
            reason: "use letters, digits and . _ - / : = , + @",
        });
    }
    Ok(())
}

/// Splits `repo:tag` (the tag defaults to `latest`), checking the characters the engine takes.
fn split_tag(tag: &str) -> Result<(&str, &str), ImageError> {
    let invalid = |reason| ImageError::Invalid {
        what: "image tag",
        value: tag.to_owned(),
        reason,
    };
    let (repo, version) = match tag.rfind(':') {
        Some(i) if !tag[i..].contains('/') => (&tag[..i], &tag[i + 1..]),
        _ => (tag, "latest"),
    };
    let repo_ok = !repo.is_empty()
        && repo
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-/:".contains(c));
    if !repo_ok {
        return Err(invalid(
            "the repository takes lowercase letters, digits and . _ - /",
        ));
    }
    let version_ok = !version.is_empty()
        && version.len() <= 128
        && version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if !version_ok {
        return Err(invalid(
            "the tag takes letters, digits and . _ - (up to 128)",
        ));
    }
    Ok((repo, version))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Import {
    /// The image settings, labels last, for a given content hash.
    fn changes(&self, content: &str) -> Vec<String> {
        let mut changes = self.changes.clone();
        changes.push(format!("LABEL {LABEL_KIND}={}", self.kind));
        for (k, v) in &self.labels {
            changes.push(format!("LABEL {k}={v}"));
        }
        changes.push(format!("LABEL {LABEL_CONTENT}={content}"));
        changes
    }

    /// The content hash of this import given a digest of its file tree (or recipe).
    fn content(&self, tree: &[u8]) -> Result<String, ImageError> {
        split_tag(&self.tag)?;
        for (k, v) in &self.labels {
            check_label(k, v)?;
            if k == LABEL_KIND || k == LABEL_CONTENT {
                return Err(ImageError::Invalid {
                    what: "label key",
                    value: k.clone(),
                    reason: "wharf sets this label itself",
                });
            }
        }
        let mut h = Sha256::new();
        h.update(b"wharf image v1\n");
        h.update(self.kind.as_bytes());
        h.update(b"\n");
        for change in self.changes("") {
            h.update(change.as_bytes());
            h.update(b"\n");
        }
        h.update(tree);
        Ok(hex(&h.finalize()))
    }

    /// The image the tag names, if it carries `content`.
    async fn existing(&self, engine: &Engine, content: &str) -> Result<Option<String>, ImageError> {
        match engine.docker().inspect_image(&self.tag).await {
            Ok(image) => {
                let labels = image.config.and_then(|c| c.labels).unwrap_or_default();
                if labels.get(LABEL_CONTENT).map(String::as_str) == Some(content) {
                    Ok(image.id)
                } else {
                    Ok(None)
                }
            }
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(e) => Err(engine
                .api_error(format!("inspect image {}", self.tag), e)
                .into()),
        }
    }

    /// Imports `body` (a tar stream) under the tag unless an image with `content` is there.
    ///
    /// `import` sends the request: `create_image` with the options it is given and the body.
    async fn run<F, S>(
        &self,
        engine: &Engine,
        content: String,
        import: F,
    ) -> Result<BuiltImage, ImageError>
    where
        F: FnOnce(CreateImageOptions) -> S,
        S: futures::Stream<Item = Result<CreateImageInfo, bollard::errors::Error>>,
    {
        // One import at a time in this process, so two callers ensuring the same image do not
        // both import it (each import makes a new id). Other processes may still race: that is
        // tolerated below.
        static IMPORTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        let _one_at_a_time = IMPORTS.lock().await;
        if let Some(id) = self.existing(engine, &content).await? {
            tracing::debug!(tag = %self.tag, %id, "image: reusing");
            return Ok(BuiltImage {
                tag: self.tag.clone(),
                id,
                content,
                reused: true,
            });
        }
        let (repo, version) = split_tag(&self.tag)?;
        // The image the tag named before (other content): removed below if unused.
        let previous = engine
            .docker()
            .inspect_image(&self.tag)
            .await
            .ok()
            .and_then(|i| i.id);
        let options = CreateImageOptionsBuilder::default()
            .from_src("-")
            .repo(repo)
            .tag(version)
            .message(&format!("wharf {} image", self.kind))
            .changes(self.changes(&content))
            .build();
        let what = format!("import image {}", self.tag);
        let mut progress = std::pin::pin!(import(options));
        let mut imported = None;
        while let Some(item) = progress.next().await {
            let info = item.map_err(|e| engine.api_error(what.clone(), e))?;
            if let Some(status) = info.status.filter(|s| s.starts_with("sha256:")) {
                imported = Some(status);
            }
        }
        let imported = imported.ok_or_else(|| EngineError::Api {
            engine: engine.name().to_owned(),
            what: what.clone(),
            reason: "the engine reported no image id".to_owned(),
        })?;
        let found = engine
            .docker()
            .inspect_image(&self.tag)
            .await
            .map_err(|e| engine.api_error(format!("inspect image {}", self.tag), e))?;
        let found_id = found.id.clone().unwrap_or_default();
        if found_id != imported {
            // Another builder may have imported the same content under the tag meanwhile.
            let labels = found.config.and_then(|c| c.labels).unwrap_or_default();
            if labels.get(LABEL_CONTENT) != Some(&content) {
                return Err(ImageError::Mismatch {
                    tag: self.tag.clone(),
                    imported,
                    found: found_id,
                });
            }
        }
        if let Some(previous) = previous.filter(|p| *p != found_id) {
            // Best effort: an image still used by a container, or tagged elsewhere, stays.
            let options = RemoveImageOptionsBuilder::default().build();
            let _ = engine
                .docker()
                .remove_image(&previous, Some(options), None)
                .await;
        }
        tracing::info!(tag = %self.tag, id = %found_id, kind = self.kind, "image: imported");
        Ok(BuiltImage {
            tag: self.tag.clone(),
            id: found_id,
            content,
            reused: false,
        })
    }

    /// Imports an in-memory root filesystem.
    async fn tree(&self, engine: &Engine, fs: &Rootfs) -> Result<BuiltImage, ImageError> {
        let tar = fs.to_tar().map_err(|source| ImageError::Io {
            path: PathBuf::from("<root filesystem>"),
            source,
        })?;
        let content = self.content(&Sha256::digest(&tar))?;
        let docker = engine.docker();
        self.run(engine, content, |options| {
            docker.create_image(
                Some(options),
                Some(bollard::body_full(Bytes::from(tar))),
                None,
            )
        })
        .await
    }
}

// ---------------------------------------------------------------------------------------------
// Host Python.

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
    let out = run(tokio::process::Command::new(python).args(["-c", PYTHON_FACTS])).await?;
    serde_json::from_slice(&out).map_err(|e| ImageError::Python {
        python: python.to_string_lossy().into_owned(),
        reason: format!("unexpected answer ({e})"),
    })
}

/// Runs a helper program and returns its stdout, or a typed error with its stderr.
async fn run(cmd: &mut tokio::process::Command) -> Result<Vec<u8>, ImageError> {
    let program = cmd.as_std().get_program().to_string_lossy().into_owned();
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| ImageError::Spawn {
            program: program.clone(),
            source,
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(8).collect();
        return Err(ImageError::Command {
            program,
            status: out.status.to_string(),
            stderr: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        });
    }
    Ok(out.stdout)
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
            Ok(m) if m.file_type().is_symlink() && !fs.nodes.contains_key(dir) => {
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

// ---------------------------------------------------------------------------------------------
// Static binaries.

/// Checks that `data` is an ELF executable without a program interpreter.
fn check_static(path: &Path, data: &[u8]) -> Result<(), ImageError> {
    let not_static = |reason: &str| ImageError::NotStatic {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    if data.len() < 64 || &data[..4] != b"\x7fELF" {
        return Err(not_static("not an ELF file"));
    }
    let (class, little) = (data[4], data[5] == 1);
    let u16_at = |o: usize| {
        let b = [data[o], data[o + 1]];
        if little {
            u16::from_le_bytes(b)
        } else {
            u16::from_be_bytes(b)
        }
    };
    let u32_at = |o: usize| {
        let b = [data[o], data[o + 1], data[o + 2], data[o + 3]];
        if little {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        }
    };
    let (phoff, phentsize, phnum) = match class {
        2 => {
            let b: [u8; 8] = data[0x20..0x28].try_into().expect("8 bytes");
            let off = if little {
                u64::from_le_bytes(b)
            } else {
                u64::from_be_bytes(b)
            };
            (off as usize, u16_at(0x36) as usize, u16_at(0x38) as usize)
        }
        1 => (
            u32_at(0x1c) as usize,
            u16_at(0x2a) as usize,
            u16_at(0x2c) as usize,
        ),
        _ => return Err(not_static("unknown ELF class")),
    };
    const ET_EXEC: u16 = 2;
    const ET_DYN: u16 = 3;
    if !matches!(u16_at(0x10), ET_EXEC | ET_DYN) {
        return Err(not_static("not an executable"));
    }
    const PT_INTERP: u32 = 3;
    for i in 0..phnum {
        let at = phoff.saturating_add(i.saturating_mul(phentsize));
        if at.saturating_add(4) > data.len() {
            return Err(not_static("truncated program headers"));
        }
        if u32_at(at) == PT_INTERP {
            return Err(not_static(
                "it is dynamically linked (it names a program interpreter)",
            ));
        }
    }
    Ok(())
}

/// Builds (or reuses) an image holding one statically linked executable as its entrypoint.
///
/// The binary is copied to `opts.path_in_image` (default `/usr/local/bin/<file name>`, mode
/// 0755) in the skeleton root filesystem; the image's entrypoint is that path. It needs no
/// mounts: run it with `network_mode: none`, a read-only root filesystem and any user.
///
/// # Errors
///
/// [`ImageError::NotStatic`] if the binary is dynamically linked or not an ELF executable;
/// [`ImageError::Io`] if it cannot be read; [`ImageError::Engine`] if the import fails.
pub async fn ensure_static_binary(
    engine: &Engine,
    opts: &StaticBinaryOptions,
) -> Result<StaticBinaryImage, ImageError> {
    let io = |source| ImageError::Io {
        path: opts.binary.clone(),
        source,
    };
    let mut data = Vec::new();
    std::fs::File::open(&opts.binary)
        .and_then(|mut f| f.read_to_end(&mut data))
        .map_err(io)?;
    check_static(&opts.binary, &data)?;
    let name = opts
        .binary
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| ImageError::Invalid {
            what: "binary",
            value: opts.binary.display().to_string(),
            reason: "its file name must be UTF-8",
        })?;
    let entrypoint = opts
        .path_in_image
        .clone()
        .unwrap_or_else(|| Path::new("/usr/local/bin").join(name));
    let inside = image_path(&entrypoint)?;
    let tag = match &opts.tag {
        Some(tag) => tag.clone(),
        None => format!(
            "wharf/{}:latest",
            name.to_ascii_lowercase().replace(
                |c: char| !(c.is_ascii_alphanumeric() || "._-".contains(c)),
                "-"
            )
        ),
    };
    let mut fs = Rootfs::skeleton();
    fs.file(&inside, 0o755, data);
    let import = Import {
        tag,
        kind: "static",
        changes: vec![format!("ENTRYPOINT [\"/{inside}\"]")],
        labels: opts.labels.clone(),
    };
    let built = import.tree(engine, &fs).await?;
    Ok(StaticBinaryImage {
        image: built.tag,
        id: built.id,
        entrypoint,
        reused: built.reused,
    })
}

// ---------------------------------------------------------------------------------------------
// Debian Python.

/// Hashes the `wharf_worker` package's files (sorted paths and contents).
fn hash_tree(h: &mut Sha256, root: &Path, dir: &Path) -> Result<(), ImageError> {
    let io = |source| ImageError::Io {
        path: dir.to_owned(),
        source,
    };
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(io)?
        .collect::<Result<_, _>>()
        .map_err(io)?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let ty = entry.file_type().map_err(io)?;
        if path.file_name() == Some("__pycache__".as_ref()) {
            continue;
        }
        let rel = path.strip_prefix(root).unwrap_or(&path);
        if ty.is_dir() {
            hash_tree(h, root, &path)?;
        } else if ty.is_file() {
            let data = std::fs::read(&path).map_err(|source| ImageError::Io {
                path: path.clone(),
                source,
            })?;
            h.update(rel.to_string_lossy().as_bytes());
            h.update((data.len() as u64).to_be_bytes());
            h.update(&data);
        }
    }
    Ok(())
}

/// Copies a directory tree (regular files and directories; `__pycache__` left out).
fn copy_tree(from: &Path, to: &Path) -> Result<(), ImageError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| ImageError::Io { path, source }
    };
    std::fs::create_dir_all(to).map_err(io(to))?;
    for entry in std::fs::read_dir(from).map_err(io(from))? {
        let entry = entry.map_err(io(from))?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let ty = entry.file_type().map_err(io(&src))?;
        if ty.is_dir() && entry.file_name() != "__pycache__" {
            copy_tree(&src, &dst)?;
        } else if ty.is_file() {
            std::fs::copy(&src, &dst).map_err(io(&src))?;
        }
    }
    Ok(())
}

/// Writes a directory tree as a tar stream: ownership and modes kept, symlinks stored as
/// links, device nodes and sockets left out, and the contents of `dev`, `proc` and `sys`
/// skipped (the engine provides them).
fn tar_tree<W: std::io::Write>(
    tar: &mut tar::Builder<W>,
    root: &Path,
    dir: &Path,
) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let rel = path.strip_prefix(root).expect("below the root");
        let ty = entry.file_type()?;
        if !(ty.is_dir() || ty.is_file() || ty.is_symlink()) {
            continue;
        }
        tar.append_path_with_name(&path, rel)?;
        let skip = ["dev", "proc", "sys"].iter().any(|d| rel == Path::new(d));
        if ty.is_dir() && !skip {
            tar_tree(tar, root, &path)?;
        }
    }
    Ok(())
}

/// Removes a directory tree when dropped (the debootstrap root filesystem).
struct TempTree(PathBuf);

impl Drop for TempTree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Builds (or reuses) a self-contained Python image from Debian's packages.
///
/// Runs `debootstrap --variant=minbase --include=<packages> <suite> <dir> [<mirror>]` (root
/// privileges and Debian's package servers needed; about a minute), copies the
/// `wharf_worker` package into `/usr/lib/python3/dist-packages`, writes the tree as a tar
/// stream and imports it, with `/usr/bin/python3` as its entrypoint. Run a worker with the
/// command `-m wharf_worker.demo` (or your module), as any user, with no mounts.
///
/// Idempotent by recipe: the content hash covers the suite, mirror, packages and the worker
/// package's files, so a second call with the same inputs reuses the image without running
/// debootstrap. (The packages are whatever the suite held at build time.)
///
/// # Errors
///
/// [`ImageError::Spawn`] if `debootstrap` is not installed (`apt-get install debootstrap`);
/// [`ImageError::Command`] if it fails; [`ImageError::Io`] for the temporary tree;
/// [`ImageError::Engine`] if the import fails.
pub async fn ensure_debian_python(
    engine: &Engine,
    opts: &DebianPythonOptions,
) -> Result<BuiltImage, ImageError> {
    let package = opts.worker_package.join("wharf_worker");
    if !package.join("__init__.py").is_file() {
        return Err(ImageError::Invalid {
            what: "worker package directory",
            value: opts.worker_package.display().to_string(),
            reason: "it must hold wharf_worker/__init__.py",
        });
    }
    for p in &opts.packages {
        if p.is_empty()
            || !p
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        {
            return Err(ImageError::Invalid {
                what: "package",
                value: p.clone(),
                reason: "a Debian package name",
            });
        }
    }
    let import = Import {
        tag: opts.tag.clone(),
        kind: "debian-python",
        changes: vec![
            "ENTRYPOINT [\"/usr/bin/python3\"]".to_owned(),
            "ENV PYTHONDONTWRITEBYTECODE=1".to_owned(),
        ],
        labels: opts.labels.clone(),
    };
    let mut recipe = Sha256::new();
    recipe.update(
        format!(
            "debootstrap minbase {} {} {}\n",
            opts.suite,
            opts.mirror.as_deref().unwrap_or("-"),
            opts.packages.join(",")
        )
        .as_bytes(),
    );
    hash_tree(&mut recipe, &opts.worker_package, &package)?;
    let content = import.content(&recipe.finalize())?;
    if let Some(id) = import.existing(engine, &content).await? {
        return Ok(BuiltImage {
            tag: import.tag,
            id,
            content,
            reused: true,
        });
    }

    let base = opts.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    let root = TempTree(base.join(format!(
        "wharf-debian-{}-{}",
        std::process::id(),
        &content[..12]
    )));
    let _ = std::fs::remove_dir_all(&root.0);
    let mut cmd = tokio::process::Command::new("debootstrap");
    cmd.arg("--variant=minbase")
        .arg(format!("--include={}", opts.packages.join(",")))
        .arg(&opts.suite)
        .arg(&root.0);
    if let Some(mirror) = &opts.mirror {
        cmd.arg(mirror);
    }
    tracing::info!(suite = %opts.suite, dir = %root.0.display(), "image: running debootstrap");
    run(&mut cmd).await?;
    // Trim what a worker never needs: package caches and lists.
    for junk in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        let dir = root.0.join(junk);
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                if e.file_type().map(|t| t.is_file()).unwrap_or(false) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
    copy_tree(
        &package,
        &root.0.join("usr/lib/python3/dist-packages/wharf_worker"),
    )?;

    // Write the tar to a file next to the tree, then stream it to the engine.
    let tar_path = root.0.with_extension("tar");
    let _tar_file = TempFile(tar_path.clone());
    let (tree, tar_out) = (root.0.clone(), tar_path.clone());
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let file = std::io::BufWriter::new(std::fs::File::create(&tar_out)?);
        let mut tar = tar::Builder::new(file);
        tar.follow_symlinks(false);
        tar_tree(&mut tar, &tree, &tree)?;
        tar.into_inner()?.into_inner().map_err(|e| e.into_error())?;
        Ok(())
    })
    .await
    .expect("the tar writer does not panic")
    .map_err(|source| ImageError::Io {
        path: tar_path.clone(),
        source,
    })?;
    let file = tokio::fs::File::open(&tar_path)
        .await
        .map_err(|source| ImageError::Io {
            path: tar_path.clone(),
            source,
        })?;
    let docker = engine.docker();
    import
        .run(engine, content, |options| {
            docker.create_image(
                Some(options),
                Some(bollard::body_try_stream(file_body(file))),
                None,
            )
        })
        .await
}

/// Removes a file when dropped.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A request body that streams a file in 1 MiB pieces.
fn file_body(
    file: tokio::fs::File,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    use tokio::io::AsyncReadExt;
    let chunks = futures::stream::try_unfold(file, |mut file| async move {
        let mut buf = vec![0u8; 1 << 20];
        let n = file.read(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.truncate(n);
        Ok(Some((Bytes::from(buf), file)))
    });
    chunks
}

// ---------------------------------------------------------------------------------------------
// Listing.

/// The engine's wharf images (those with a [`LABEL_KIND`] label), newest first.
pub async fn list(engine: &Engine) -> Result<Vec<ImageInfo>, ImageError> {
    let mut filters = std::collections::HashMap::new();
    filters.insert("label".to_owned(), vec![LABEL_KIND.to_owned()]);
    let options = ListImagesOptionsBuilder::default()
        .filters(&filters)
        .build();
    let images = engine
        .docker()
        .list_images(Some(options))
        .await
        .map_err(|e| engine.api_error("list images", e))?;
    let mut out: Vec<ImageInfo> = images
        .into_iter()
        .map(|i| ImageInfo {
            kind: i.labels.get(LABEL_KIND).cloned().unwrap_or_default(),
            content: i.labels.get(LABEL_CONTENT).cloned().unwrap_or_default(),
            id: i.id,
            tags: i
                .repo_tags
                .into_iter()
                .filter(|t| t != "<none>:<none>")
                .collect(),
            size: i.size,
            created: i.created,
        })
        .collect();
    out.sort_by(|a, b| b.created.cmp(&a.created).then(a.id.cmp(&b.id)));
    Ok(out)
}

/// Removes wharf's untagged images (replaced by a newer import while a container still used
/// them) that nothing uses any more. Returns the ids removed; images still in use stay.
pub async fn prune(engine: &Engine) -> Result<Vec<String>, ImageError> {
    let mut filters = std::collections::HashMap::new();
    filters.insert("label".to_owned(), vec![LABEL_KIND.to_owned()]);
    filters.insert("dangling".to_owned(), vec!["true".to_owned()]);
    let options = ListImagesOptionsBuilder::default()
        .filters(&filters)
        .build();
    let images = engine
        .docker()
        .list_images(Some(options))
        .await
        .map_err(|e| engine.api_error("list images", e))?;
    let mut removed = Vec::new();
    for image in images {
        let options = RemoveImageOptionsBuilder::default().build();
        if engine
            .docker()
            .remove_image(&image.id, Some(options), None)
            .await
            .is_ok()
        {
            removed.push(image.id);
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(tar: &[u8]) -> Vec<(String, tar::EntryType, u32, String)> {
        let mut archive = tar::Archive::new(tar);
        archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let link = e
                    .link_name()
                    .unwrap()
                    .map(|l| l.display().to_string())
                    .unwrap_or_default();
                (
                    e.path().unwrap().display().to_string(),
                    e.header().entry_type(),
                    e.header().mode().unwrap(),
                    link,
                )
            })
            .collect()
    }

    #[test]
    fn skeleton_has_a_real_sbin_a_sticky_tmp_and_usr_symlinks() {
        let tar = Rootfs::skeleton().to_tar().unwrap();
        let e = entries(&tar);
        let find = |p: &str| e.iter().find(|x| x.0.trim_end_matches('/') == p).cloned();
        assert_eq!(find("sbin").unwrap().1, tar::EntryType::Directory);
        assert_eq!(find("tmp").unwrap().2, 0o1777);
        assert_eq!(find("root").unwrap().2, 0o755);
        let bin = find("bin").unwrap();
        assert_eq!(
            (bin.1, bin.3.as_str()),
            (tar::EntryType::Symlink, "usr/bin")
        );
        assert_eq!(find("lib64").unwrap().3, "usr/lib64");
        for dir in ["usr", "proc", "sys", "dev", "run", "etc"] {
            assert_eq!(find(dir).unwrap().1, tar::EntryType::Directory, "{dir}");
        }
        // Deterministic: the same tree, the same bytes.
        assert_eq!(tar, Rootfs::skeleton().to_tar().unwrap());
    }

    #[test]
    fn files_get_their_parent_directories_first() {
        let mut fs = Rootfs::skeleton();
        fs.file("usr/local/bin/w", 0o755, b"x".to_vec());
        let e = entries(&fs.to_tar().unwrap());
        let pos = |p: &str| {
            e.iter()
                .position(|x| x.0.trim_end_matches('/') == p)
                .unwrap()
        };
        assert!(pos("usr") < pos("usr/local"));
        assert!(pos("usr/local") < pos("usr/local/bin"));
        assert!(pos("usr/local/bin") < pos("usr/local/bin/w"));
    }

    #[test]
    fn image_paths_are_absolute_and_plain() {
        assert_eq!(
            image_path(Path::new("/usr/local/bin/w")).unwrap(),
            "usr/local/bin/w"
        );
        assert!(image_path(Path::new("w")).is_err());
        assert!(image_path(Path::new("/a/../b")).is_err());
        assert!(image_path(Path::new("/")).is_err());
    }

    #[test]
    fn tags_and_labels_are_checked() {
        assert_eq!(split_tag("wharf/x:1").unwrap(), ("wharf/x", "1"));
        assert_eq!(split_tag("wharf/x").unwrap(), ("wharf/x", "latest"));
        assert_eq!(
            split_tag("localhost:5000/x").unwrap(),
            ("localhost:5000/x", "latest")
        );
        assert!(split_tag("Wharf/X:1").is_err());
        assert!(split_tag("wharf/x:").is_err());
        assert!(check_label("wharf.test", "1").is_ok());
        assert!(check_label("wharf.test", "a b").is_err());
        assert!(check_label("", "1").is_err());
    }

    #[test]
    fn content_hash_covers_kind_settings_labels_and_tree() {
        let import = |kind, labels: Vec<(String, String)>| Import {
            tag: "wharf/x:1".to_owned(),
            kind,
            changes: Vec::new(),
            labels,
        };
        let a = import("static", vec![]).content(b"tree").unwrap();
        assert_eq!(a, import("static", vec![]).content(b"tree").unwrap());
        assert_ne!(a, import("static", vec![]).content(b"tree2").unwrap());
        assert_ne!(a, import("host-python", vec![]).content(b"tree").unwrap());
        let reserved = vec![(LABEL_CONTENT.to_owned(), "x".to_owned())];
        assert!(import("static", reserved).content(b"tree").is_err());
        let labelled = vec![("wharf.test".to_owned(), "1".to_owned())];
        assert_ne!(a, import("static", labelled).content(b"tree").unwrap());
    }

    #[test]
    fn dynamic_and_non_elf_binaries_are_refused() {
        let me = std::env::current_exe().unwrap();
        let data = std::fs::read(&me).unwrap();
        // This test binary is linked dynamically (the host build has no crt-static).
        assert!(matches!(
            check_static(&me, &data),
            Err(ImageError::NotStatic { .. })
        ));
        assert!(matches!(
            check_static(Path::new("x"), b"#!/bin/sh\necho hi\n"),
            Err(ImageError::NotStatic { .. })
        ));
        // A minimal static ELF64: header only, no program headers.
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        elf[0x10] = 2;
        assert!(check_static(Path::new("x"), &elf).is_ok());
        // The same with a PT_INTERP program header.
        let mut dynamic = elf.clone();
        dynamic[0x20] = 64;
        dynamic[0x36] = 56;
        dynamic[0x38] = 1;
        dynamic.extend_from_slice(&[3, 0, 0, 0]);
        dynamic.resize(64 + 56, 0);
        assert!(check_static(Path::new("x"), &dynamic).is_err());
    }
}
