//! A deploy's body: a tar archive holding `pipeline.toml` at its root and the files it names
//! (components, kv files) at the paths it names them by. Read whole into memory (the body is
//! already bounded by the server's body limit), every entry checked where it enters.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

/// The file of a bundle that describes the pipeline.
pub const PIPELINE_FILE: &str = "pipeline.toml";
/// Files in one bundle, the pipeline file included.
pub const MAX_BUNDLE_FILES: usize = 256;
/// Bytes of a path inside a bundle.
pub const MAX_BUNDLE_PATH: usize = 512;
/// Bytes of the pipeline file.
pub const MAX_PIPELINE_FILE: usize = 1 << 20;

/// A bundle, read and checked: its pipeline file and every other file by normalised path.
#[derive(Debug)]
pub struct Bundle {
    pub pipeline_file: String,
    pub files: BTreeMap<PathBuf, Vec<u8>>,
}

impl Bundle {
    /// Read a tar archive; an error says what is wrong with it, for a 422.
    pub fn read(tar: &[u8]) -> Result<Self, String> {
        let mut archive = tar::Archive::new(tar);
        let entries = archive
            .entries()
            .map_err(|e| format!("the body is not a tar archive: {e}"))?;
        let mut pipeline_file = None;
        let mut files = BTreeMap::new();
        let mut count = 0;
        for entry in entries {
            let mut entry = entry.map_err(|e| {
                let e = e.to_string();
                format!(
                    "the body is not a tar archive, or a damaged one: {}",
                    crate::text::truncate(&e, 120)
                )
            })?;
            let kind = entry.header().entry_type();
            if kind.is_dir() {
                continue;
            }
            count += 1;
            if count > MAX_BUNDLE_FILES {
                return Err(format!(
                    "the bundle has more than {MAX_BUNDLE_FILES} files (the limit)"
                ));
            }
            let raw = entry.path_bytes().into_owned();
            let shown = String::from_utf8_lossy(&raw).into_owned();
            if raw.len() > MAX_BUNDLE_PATH {
                return Err(format!(
                    "a path in the bundle is longer than {MAX_BUNDLE_PATH} bytes: {}...",
                    crate::text::truncate(&shown, 64)
                ));
            }
            if !kind.is_file() {
                return Err(format!(
                    "`{shown}` in the bundle is not a regular file (links and devices are refused)"
                ));
            }
            let path = std::str::from_utf8(&raw)
                .ok()
                .and_then(|p| normalise(Path::new(p)))
                .ok_or_else(|| {
                    format!(
                        "`{shown}` in the bundle is not a relative UTF-8 path inside the bundle"
                    )
                })?;
            let mut bytes = Vec::with_capacity(entry.size().min(tar.len() as u64) as usize);
            entry
                .read_to_end(&mut bytes)
                .map_err(|e| format!("cannot read `{shown}` from the bundle: {e}"))?;
            if path == Path::new(PIPELINE_FILE) {
                if bytes.len() > MAX_PIPELINE_FILE {
                    return Err(format!(
                        "`{PIPELINE_FILE}` is larger than {MAX_PIPELINE_FILE} bytes (the limit)"
                    ));
                }
                let text = String::from_utf8(bytes)
                    .map_err(|_| format!("`{PIPELINE_FILE}` is not UTF-8 text"))?;
                pipeline_file = Some(text);
            } else if files.insert(path, bytes).is_some() {
                return Err(format!("`{shown}` is in the bundle twice"));
            }
        }
        let pipeline_file = pipeline_file.ok_or_else(|| {
            format!("the bundle has no `{PIPELINE_FILE}` at its root (a tar of the pipeline file and the files it names)")
        })?;
        Ok(Self {
            pipeline_file,
            files,
        })
    }
}

/// `path` without `.` parts, or `None` if it is absolute, empty, or climbs out with `..`: how
/// the pipeline file's paths and the archive's are compared.
pub fn normalise(path: &Path) -> Option<PathBuf> {
    let mut normal = PathBuf::new();
    for part in path.components() {
        match part {
            Component::Normal(part) => normal.push(part),
            Component::CurDir => {}
            Component::ParentDir => {
                if !normal.pop() {
                    return None;
                }
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    (!normal.as_os_str().is_empty()).then_some(normal)
}

/// A tar archive of `files` (path in the bundle -> bytes), as `stagehand deploy` sends it.
pub fn write(files: &BTreeMap<PathBuf, Vec<u8>>) -> std::io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, bytes) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        builder.append_data(&mut header, path, bytes.as_slice())?;
    }
    builder.into_inner()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        write(
            &files
                .iter()
                .map(|(path, bytes)| (PathBuf::from(path), bytes.to_vec()))
                .collect(),
        )
        .unwrap()
    }

    #[test]
    fn a_bundle_is_its_pipeline_file_and_the_rest() {
        let bundle = Bundle::read(&tar_of(&[
            ("pipeline.toml", b"name = 'p'"),
            ("./c/a.wasm", b"a"),
        ]))
        .unwrap();
        assert_eq!(bundle.pipeline_file, "name = 'p'");
        assert_eq!(bundle.files[Path::new("c/a.wasm")], b"a");
    }

    #[test]
    fn bad_bundles_say_what_is_wrong() {
        let no_pipeline = Bundle::read(&tar_of(&[("a.wasm", b"a")])).unwrap_err();
        assert!(no_pipeline.contains("no `pipeline.toml`"), "{no_pipeline}");
        let not_tar = Bundle::read(b"not a tar archive, just some bytes ............").unwrap_err();
        assert!(not_tar.contains("tar"), "{not_tar}");
        let many: Vec<(String, Vec<u8>)> = (0..=MAX_BUNDLE_FILES)
            .map(|i| (format!("f{i}"), vec![]))
            .collect();
        let many: Vec<(&str, &[u8])> = many
            .iter()
            .map(|(p, b)| (p.as_str(), b.as_slice()))
            .collect();
        let too_many = Bundle::read(&tar_of(&many)).unwrap_err();
        assert!(too_many.contains("more than 256 files"), "{too_many}");
    }

    #[test]
    fn paths_stay_inside_the_bundle() {
        assert_eq!(normalise(Path::new("./a/../b")), Some(PathBuf::from("b")));
        assert_eq!(normalise(Path::new("../b")), None);
        assert_eq!(normalise(Path::new("/etc/passwd")), None);
        assert_eq!(normalise(Path::new(".")), None);
    }
}
