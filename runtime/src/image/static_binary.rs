//! The static-binary image: the skeleton root filesystem plus one statically linked executable,
//! its entrypoint. Dynamically linked binaries are refused by reading their ELF program headers.

use std::io::Read;
use std::path::{Path, PathBuf};

use wharf_actors::engine::Engine;

use super::import::Import;
use super::rootfs::{image_path, Rootfs};
use super::ImageError;

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

#[cfg(test)]
mod tests {
    use super::*;

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
