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
//! One file per concern: `image/rootfs.rs` writes root filesystems as tar streams,
//! `image/import.rs` imports them (labels, content hash, tag check, reuse),
//! `image/host_python.rs`, `image/static_binary.rs` and `image/debian.rs` make the three kinds.
//! This file holds what they share: errors, [`Mount`], [`BuiltImage`], [`list`] and [`prune`].
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

mod debian;
mod host_python;
mod import;
mod rootfs;
mod static_binary;

use std::path::PathBuf;
use std::process::Stdio;

use bollard::query_parameters::{ListImagesOptionsBuilder, RemoveImageOptionsBuilder};
use thiserror::Error;
use wharf_actors::engine::{Engine, EngineError};

pub use debian::{ensure_debian_python, DebianPythonOptions};
pub use host_python::{ensure_host_python, HostPythonImage, HostPythonOptions};
pub use static_binary::{ensure_static_binary, StaticBinaryImage, StaticBinaryOptions};

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

/// Runs a helper program and returns its stdout, or a typed error with its stderr.
pub(crate) async fn run_program(cmd: &mut tokio::process::Command) -> Result<Vec<u8>, ImageError> {
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
