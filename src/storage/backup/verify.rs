//! [`verify`]: is this directory a complete, intact backup?
//!
//! Offline and read-only: it never opens the directory as a repository
//! (which would assign a server id and change the header) and never
//! repairs anything. It reports every problem it finds, each naming the
//! file and what was expected against what was found.

use std::collections::BTreeSet;
use std::fmt;
use std::fs::{self, File};
use std::io::{ErrorKind, Read};
use std::path::Path;

use crate::storage::backup::manifest::{
    read_marker, Manifest, INCOMPLETE_FILE, MANIFEST_FILE, MANIFEST_FORMAT, MANIFEST_VERSION,
};
use crate::storage::backup::receive::safe_relative_path;
use crate::storage::backup::IO_PIECE;
use crate::storage::commit_log::LOG_DIR;
use crate::storage::header::{Header, FORMAT_VERSION, HEADER_FILE};
use crate::storage::object_store::{COLL_DIR, OBJECTS_FILE};
use crate::types::{hex, CommitNumber};

/// A backup that passed every check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    pub repository_id: String,
    pub snapshot_commit: CommitNumber,
    pub files: usize,
    pub bytes: u64,
    pub source: String,
}

/// One thing wrong with a backup directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// The path is not a directory (or cannot be read).
    NotADirectory {
        dir: String,
        error: String,
    },
    /// No manifest: the copy never finished. `marker` is what the
    /// incomplete marker says, if present.
    Incomplete {
        marker: Option<String>,
    },
    BadManifest(String),
    MissingFile {
        path: String,
    },
    SizeMismatch {
        path: String,
        expected: u64,
        found: u64,
    },
    ChecksumMismatch {
        path: String,
        expected: String,
        found: String,
    },
    Unreadable {
        path: String,
        error: String,
    },
    BadHeader(String),
    HeaderMismatch {
        field: &'static str,
        expected: String,
        found: String,
    },
    /// A file the manifest does not list (a server ran on the copy, or
    /// something was added).
    UnexpectedFile {
        path: String,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::NotADirectory { dir, error } => {
                write!(f, "{dir} is not a readable directory: {error}")
            }
            Problem::Incomplete { marker } => {
                write!(f, "incomplete backup: no {MANIFEST_FILE}")?;
                if let Some(text) = marker {
                    let detail: Vec<&str> = text
                        .lines()
                        .filter(|l| l.starts_with("state:") || l.starts_with("reason:"))
                        .collect();
                    write!(f, " ({INCOMPLETE_FILE} says {})", detail.join(", "))?;
                }
                Ok(())
            }
            Problem::BadManifest(why) => write!(f, "bad manifest: {why}"),
            Problem::MissingFile { path } => write!(f, "{path}: missing"),
            Problem::SizeMismatch {
                path,
                expected,
                found,
            } => {
                write!(f, "{path}: size {found} bytes, manifest says {expected}")
            }
            Problem::ChecksumMismatch {
                path,
                expected,
                found,
            } => {
                write!(f, "{path}: BLAKE3 {found}, manifest says {expected}")
            }
            Problem::Unreadable { path, error } => write!(f, "{path}: cannot be read: {error}"),
            Problem::BadHeader(why) => write!(f, "header: {why}"),
            Problem::HeaderMismatch {
                field,
                expected,
                found,
            } => {
                write!(f, "header: {field} is {found}, expected {expected}")
            }
            Problem::UnexpectedFile { path } => {
                write!(f, "{path}: not listed in the manifest")
            }
        }
    }
}

/// BLAKE3 of a whole file, lowercase hex.
pub(crate) fn hash_file(path: &Path) -> std::io::Result<String> {
    let mut f = File::open(path)?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; IO_PIECE];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(hasher.finalize().as_bytes()))
}

/// Every regular file under `dir` (relative, `/`-separated), except the
/// manifest, descending into `coll/` and `log/`.
fn present_files(dir: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut walk = |sub: Option<&str>| {
        let at = sub.map_or_else(|| dir.to_path_buf(), |s| dir.join(s));
        let Ok(entries) = fs::read_dir(&at) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let is_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
            let rel = match sub {
                Some(s) => format!("{s}/{name}"),
                None => name.clone(),
            };
            if is_dir && sub.is_none() && (name == COLL_DIR || name == LOG_DIR) {
                continue;
            }
            if sub.is_none() && name == MANIFEST_FILE {
                continue;
            }
            out.insert(if is_dir { format!("{rel}/") } else { rel });
        }
    };
    walk(None);
    walk(Some(COLL_DIR));
    walk(Some(LOG_DIR));
    out
}

/// One line naming `dir` and every problem `verify` found in it.
pub fn describe_problems(dir: &Path, problems: &[Problem]) -> String {
    let all: Vec<String> = problems.iter().map(ToString::to_string).collect();
    format!("{}: {}", dir.display(), all.join("; "))
}

/// Check the backup in `dir`; see the module doc.
pub fn verify(dir: &Path) -> Result<Verified, Vec<Problem>> {
    if let Err(e) = fs::read_dir(dir) {
        return Err(vec![Problem::NotADirectory {
            dir: dir.display().to_string(),
            error: e.to_string(),
        }]);
    }
    if !dir.join(MANIFEST_FILE).exists() {
        return Err(vec![Problem::Incomplete {
            marker: read_marker(dir),
        }]);
    }
    let manifest = Manifest::read(dir).map_err(|e| vec![Problem::BadManifest(e)])?;
    let mut problems = Vec::new();
    if manifest.format != MANIFEST_FORMAT {
        problems.push(Problem::BadManifest(format!(
            "format is {:?}, expected {MANIFEST_FORMAT:?}",
            manifest.format
        )));
    }
    if manifest.manifest_version != MANIFEST_VERSION {
        problems.push(Problem::BadManifest(format!(
            "manifest version {} is not supported (this build reads {MANIFEST_VERSION})",
            manifest.manifest_version
        )));
    }
    if !(1..=FORMAT_VERSION).contains(&manifest.repository_format) {
        problems.push(Problem::BadManifest(format!(
            "repository format {} is not supported (this build reads {FORMAT_VERSION})",
            manifest.repository_format
        )));
    }
    if !problems.is_empty() {
        return Err(problems);
    }

    let mut listed = BTreeSet::new();
    let mut bytes = 0;
    for f in &manifest.files {
        let Some(rel) = safe_relative_path(&f.path) else {
            problems.push(Problem::BadManifest(format!(
                "file path {:?} is not inside the backup",
                f.path
            )));
            continue;
        };
        if !listed.insert(f.path.clone()) {
            problems.push(Problem::BadManifest(format!("{} is listed twice", f.path)));
            continue;
        }
        bytes += f.size;
        let path = dir.join(rel);
        let found = match fs::metadata(&path) {
            Ok(m) if m.is_file() => m.len(),
            Ok(_) => {
                problems.push(Problem::MissingFile {
                    path: f.path.clone(),
                });
                continue;
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                problems.push(Problem::MissingFile {
                    path: f.path.clone(),
                });
                continue;
            }
            Err(e) => {
                problems.push(Problem::Unreadable {
                    path: f.path.clone(),
                    error: e.to_string(),
                });
                continue;
            }
        };
        if found != f.size {
            problems.push(Problem::SizeMismatch {
                path: f.path.clone(),
                expected: f.size,
                found,
            });
            continue;
        }
        match hash_file(&path) {
            Ok(h) if h == f.blake3 => {}
            Ok(h) => problems.push(Problem::ChecksumMismatch {
                path: f.path.clone(),
                expected: f.blake3.clone(),
                found: h,
            }),
            Err(e) => problems.push(Problem::Unreadable {
                path: f.path.clone(),
                error: e.to_string(),
            }),
        }
    }
    for extra in present_files(dir) {
        if !listed.contains(&extra) {
            problems.push(Problem::UnexpectedFile { path: extra });
        }
    }
    check_header(dir, &manifest, &mut problems);
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Verified {
        repository_id: manifest.repository_id,
        snapshot_commit: manifest.snapshot_commit,
        files: manifest.files.len(),
        bytes,
        source: manifest.source,
    })
}

fn check_header(dir: &Path, manifest: &Manifest, problems: &mut Vec<Problem>) {
    if !manifest.files.iter().any(|f| f.path == HEADER_FILE) {
        problems.push(Problem::BadManifest("the header is not listed".into()));
    }
    let path = dir.join(HEADER_FILE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        // Reported as a missing or unreadable file already.
        Err(_) => return,
    };
    let header = match Header::decode(&bytes, &path) {
        Ok(h) => h,
        Err(e) => {
            problems.push(Problem::BadHeader(e.to_string()));
            return;
        }
    };
    let mut mismatch = |field: &'static str, expected: String, found: String| {
        if expected != found {
            problems.push(Problem::HeaderMismatch {
                field,
                expected,
                found,
            });
        }
    };
    mismatch(
        "the restore-mode bit",
        "set".into(),
        if header.restore_mode { "set" } else { "clear" }.into(),
    );
    mismatch(
        "the repository id",
        manifest.repository_id.clone(),
        header.repository_id.to_string(),
    );
    mismatch(
        "the checkpoint (snapshot commit)",
        manifest.snapshot_commit.to_string(),
        header.checkpoint.to_string(),
    );
    mismatch(
        "the server id (0 until a server opens the copy)",
        "0".into(),
        header.server_id.to_string(),
    );
    if let Some(objects) = manifest.files.iter().find(|f| f.path == OBJECTS_FILE) {
        mismatch(
            "the objects.dat length",
            objects.size.to_string(),
            header.objects_len.to_string(),
        );
    }
}
