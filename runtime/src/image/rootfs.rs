//! Root filesystems as tar streams: the skeleton every wharf image shares, and files added to it.
//!
//! A [`Rootfs`] is written deterministically (sorted, root-owned, mtime 0), so the same tree
//! always gives the same bytes and the same content hash.

use std::collections::BTreeMap;
use std::path::{Component, Path};

use super::ImageError;

/// A file tree to be written as a tar stream: deterministic (sorted, root-owned, mtime 0), so
/// the same tree always hashes the same.
#[derive(Debug, Clone, Default)]
pub(super) struct Rootfs {
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
    pub(super) fn skeleton() -> Rootfs {
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

    pub(super) fn dir(&mut self, path: &str, mode: u32) {
        self.parents(path);
        self.nodes.insert(path.to_owned(), Node::Dir { mode });
    }

    pub(super) fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) {
        self.parents(path);
        self.nodes
            .insert(path.to_owned(), Node::File { mode, data });
    }

    pub(super) fn symlink(&mut self, path: &str, target: &str) {
        self.parents(path);
        self.nodes.insert(
            path.to_owned(),
            Node::Symlink {
                target: target.to_owned(),
            },
        );
    }

    /// Whether the tree has an entry at `path`.
    pub(super) fn has(&self, path: &str) -> bool {
        self.nodes.contains_key(path)
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
    pub(super) fn to_tar(&self) -> std::io::Result<Vec<u8>> {
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
pub(super) fn image_path(path: &Path) -> Result<String, ImageError> {
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
}
