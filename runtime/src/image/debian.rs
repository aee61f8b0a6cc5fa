//! The self-contained Debian Python image: `debootstrap --variant=minbase` plus Python packages,
//! with `wharf_worker` copied in, written as a tar stream from disk and streamed to the engine.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use wharf_actors::engine::Engine;

use super::import::Import;
use super::{run_program, BuiltImage, ImageError, DEBIAN_PYTHON_TAG};

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
    run_program(&mut cmd).await?;
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
