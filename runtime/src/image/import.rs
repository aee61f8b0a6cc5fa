//! Importing a root filesystem into the engine: labels, the content hash, reuse, the tag check.
//!
//! `POST /images/create?fromSrc=-` (what `docker import` calls) with `repo` and `tag`, and the
//! image settings as Dockerfile instructions (`LABEL`, `ENTRYPOINT`, `ENV`). Imports are
//! serialised within a process; a race with another process is tolerated when it imported the
//! same content.

use std::path::PathBuf;

use bollard::models::CreateImageInfo;
use bollard::query_parameters::{
    CreateImageOptions, CreateImageOptionsBuilder, RemoveImageOptionsBuilder,
};
use bytes::Bytes;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use wharf_actors::engine::{Engine, EngineError};

use super::rootfs::Rootfs;
use super::{BuiltImage, ImageError, LABEL_CONTENT, LABEL_KIND};

/// What to import: a tar stream, the image settings (Dockerfile instructions the import API
/// accepts), and the hash that identifies them.
pub(super) struct Import {
    pub(super) tag: String,
    pub(super) kind: &'static str,
    pub(super) changes: Vec<String>,
    pub(super) labels: Vec<(String, String)>,
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
    pub(super) fn content(&self, tree: &[u8]) -> Result<String, ImageError> {
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
    pub(super) async fn existing(
        &self,
        engine: &Engine,
        content: &str,
    ) -> Result<Option<String>, ImageError> {
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
    pub(super) async fn run<F, S>(
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
    pub(super) async fn tree(
        &self,
        engine: &Engine,
        fs: &Rootfs,
    ) -> Result<BuiltImage, ImageError> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
