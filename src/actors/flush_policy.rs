//! The flush policy given at start: when an acknowledged commit is durable.
//!
//! * `group` (default): fsync before acknowledging; concurrent commits share
//!   one fsync (group commit). An acknowledged commit survives a crash.
//! * `interval:MS`: acknowledge right after the commit is applied and fsync
//!   every MS milliseconds (the seed flushed every ~5 s). A crash may lose
//!   up to MS of acknowledged commits.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FlushPolicy {
    #[default]
    Group,
    /// Milliseconds between flushes (at least 1).
    Interval(u64),
}

impl FlushPolicy {
    /// The flush period of `interval:MS`.
    pub fn interval(self) -> Option<Duration> {
        match self {
            FlushPolicy::Group => None,
            FlushPolicy::Interval(ms) => Some(Duration::from_millis(ms)),
        }
    }
}

/// Why a `--flush` value was refused; the text is shown to the operator.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid flush policy {given:?}: {reason}; expected \"group\" or \"interval:MS\" (MS in milliseconds, at least 1, e.g. interval:5000)")]
pub struct FlushPolicyError {
    given: String,
    reason: &'static str,
}

impl FromStr for FlushPolicy {
    type Err = FlushPolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let refuse = |reason| FlushPolicyError {
            given: s.to_string(),
            reason,
        };
        let t = s.trim();
        if t.eq_ignore_ascii_case("group") {
            return Ok(FlushPolicy::Group);
        }
        let Some((kind, ms)) = t.split_once(':') else {
            return Err(refuse("unknown policy"));
        };
        if !kind.trim().eq_ignore_ascii_case("interval") {
            return Err(refuse("unknown policy"));
        }
        let ms: u64 = ms
            .trim()
            .parse()
            .map_err(|_| refuse("the interval is not a whole number of milliseconds"))?;
        if ms == 0 {
            return Err(refuse("the interval must be at least 1 ms"));
        }
        Ok(FlushPolicy::Interval(ms))
    }
}

/// Renders as it is parsed: `group` or `interval:MS` (shown in status).
impl fmt::Display for FlushPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FlushPolicy::Group => f.write_str("group"),
            FlushPolicy::Interval(ms) => write!(f, "interval:{ms}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_policies() {
        assert_eq!("group".parse(), Ok(FlushPolicy::Group));
        assert_eq!("GROUP".parse(), Ok(FlushPolicy::Group));
        assert_eq!("interval:5000".parse(), Ok(FlushPolicy::Interval(5000)));
        assert_eq!(" interval: 20 ".parse(), Ok(FlushPolicy::Interval(20)));
    }

    #[test]
    fn round_trips_through_display() {
        for p in [FlushPolicy::Group, FlushPolicy::Interval(250)] {
            assert_eq!(p.to_string().parse(), Ok(p));
        }
        assert_eq!(
            FlushPolicy::Interval(7).interval(),
            Some(Duration::from_millis(7))
        );
        assert_eq!(FlushPolicy::Group.interval(), None);
    }

    #[test]
    fn refuses_bad_input_with_guidance() {
        for bad in [
            "",
            "sync",
            "interval",
            "interval:",
            "interval:x",
            "interval:0",
            "interval:-5",
            "every:5",
        ] {
            let err = bad.parse::<FlushPolicy>().unwrap_err().to_string();
            assert!(
                err.contains("expected \"group\" or \"interval:MS\""),
                "{bad}: {err}"
            );
            assert!(err.contains(&format!("{bad:?}")), "{bad}: {err}");
        }
        let err = "interval:0".parse::<FlushPolicy>().unwrap_err().to_string();
        assert!(err.contains("at least 1 ms"), "{err}");
    }
}
