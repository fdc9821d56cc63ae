//! `magma compact --from BACKUP --to DIR`: the offline garbage collector.
//!
//! A thin shell over `storage::compact`: it draws the progress bar (objects
//! copied out of the source's objects, bytes written), turns a refusal or
//! failure into `error: compact: <message>` (exit 1) and formats the
//! closing line. It owns no storage logic and never talks to a server; it
//! never opens the source for writing (the storage side guarantees that).

use std::fmt;
use std::path::Path;
use std::time::Duration;

use indicatif::{HumanBytes, ProgressBar, ProgressStyle};

use crate::cli::error::CliError;
use crate::storage::compact::{compact, CompactProgress, CompactReport};

/// How often the bar redraws by itself (the spinner and elapsed time).
const TICK: Duration = Duration::from_millis(200);

/// A bar over the source's objects on stderr (drawn only on a terminal):
/// objects copied, bytes written.
fn objects_bar(total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} objects {msg}",
    ) {
        bar.set_style(style);
    }
    bar.enable_steady_tick(TICK);
    bar
}

/// Compact `from` into `to`, with a progress bar unless `quiet`.
pub fn run(from: &Path, to: &Path, quiet: bool) -> Result<Summary, CliError> {
    let mut bar: Option<ProgressBar> = None;
    let mut on_progress = |p: &CompactProgress| {
        if quiet {
            return;
        }
        let bar = bar.get_or_insert_with(|| objects_bar(p.objects_total));
        bar.set_position(p.objects_scanned);
        bar.set_message(format!("{} written", HumanBytes(p.bytes_written)));
    };
    let result = compact(from, to, &mut on_progress);
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    match result {
        Ok(report) => Ok(Summary {
            from: from.display().to_string(),
            to: to.display().to_string(),
            report,
        }),
        Err(e) => Err(CliError::Compact(e.to_string())),
    }
}

/// The closing line of a compaction.
pub struct Summary {
    pub from: String,
    pub to: String,
    pub report: CompactReport,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.report;
        write!(
            f,
            "compacted {} into {} at commit {}: kept {} objects ({} large collections, \
             {} elements), dropped {} of {}; size {} -> {} bytes ({:.1}%) in {:.2} s",
            self.from,
            self.to,
            r.commit,
            r.objects_kept,
            r.collections_kept,
            r.elements_kept,
            r.objects_dropped(),
            r.objects_before,
            r.bytes_before,
            r.bytes_after,
            100.0 * r.ratio(),
            r.elapsed.as_secs_f64()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::error::EXIT_ERROR;
    use crate::storage::Repository;

    #[test]
    fn refusals_are_compact_errors_with_exit_1() {
        let tmp = tempfile::tempdir().unwrap();
        let live = tmp.path().join("live");
        let repo = Repository::create(&live, 7, "127.0.0.1:1").unwrap();
        let e = run(&live, &tmp.path().join("out"), true).err().unwrap();
        assert_eq!((e.kind(), e.exit_code()), ("compact", EXIT_ERROR));
        assert!(e.to_string().contains("locked by a running server"), "{e}");
        drop(repo);
        let e = run(&live, &tmp.path().join("out"), true).err().unwrap();
        assert!(e.to_string().contains("not a backup"), "{e}");
    }

    #[test]
    fn a_backup_compacts_and_the_summary_names_the_sizes() {
        let tmp = tempfile::tempdir().unwrap();
        let mut repo = Repository::create(&tmp.path().join("live"), 7, "127.0.0.1:1").unwrap();
        let backup = tmp.path().join("backup");
        repo.snapshot(&tmp.path().join("scratch"))
            .unwrap()
            .copy_to(&backup)
            .unwrap();
        let out = tmp.path().join("out");
        let summary = run(&backup, &out, true).unwrap();
        let line = summary.to_string();
        assert!(line.contains("kept 1 objects"), "{line}");
        assert!(line.contains("dropped 0 of 1"), "{line}");
        let sizes = format!(
            "size {} -> {} bytes",
            summary.report.bytes_before, summary.report.bytes_after
        );
        assert!(line.contains(&sizes), "{line}");
        crate::storage::backup::verify(&out).unwrap();
    }
}
