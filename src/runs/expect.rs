//! Expectations per process: stall detection, maximum duration, a daily
//! deadline and bounds on record counts. Each check is a pure function of a
//! run (or a process) and "now", so the tracker only decides when to ask.

use super::run::{ProcessRun, RunStatus, Violation};
use crate::config::{Deadline, ProcessExpectations};
use jiff::{civil::Time, tz::TimeZone, Timestamp};

/// A parsed deadline: a time of day in an IANA time zone.
#[derive(Debug, Clone)]
pub struct DeadlineRule {
    pub time: Time,
    pub tz: TimeZone,
    pub label: String,
}

impl DeadlineRule {
    pub fn parse(d: &Deadline) -> Result<DeadlineRule, String> {
        let time: Time = d.time.parse().map_err(|e| format!("time {:?} is not HH:MM or HH:MM:SS: {e}", d.time))?;
        let tz = TimeZone::get(&d.timezone).map_err(|_| format!("unknown IANA time zone {:?}", d.timezone))?;
        Ok(DeadlineRule { time, tz, label: format!("{} {}", d.time, d.timezone) })
    }

    /// The first deadline instant strictly after `after_ns`.
    pub fn next_after(&self, after_ns: i64) -> i64 {
        let ts = Timestamp::from_nanosecond(after_ns as i128).unwrap_or(Timestamp::UNIX_EPOCH);
        let zoned = ts.to_zoned(self.tz.clone());
        let mut date = zoned.date();
        for _ in 0..3 {
            if let Ok(z) = date.to_datetime(self.time).to_zoned(self.tz.clone()) {
                let n = z.timestamp().as_nanosecond() as i64;
                if n > after_ns {
                    return n;
                }
            }
            date = date.tomorrow().unwrap_or(date);
        }
        after_ns + 86_400_000_000_000
    }
}

/// How long the run has been idle, when that makes it stalled now.
fn stalls(run: &ProcessRun, exp: &ProcessExpectations, now_ns: i64) -> Option<(i64, i64)> {
    let stall = exp.stall_after?.as_nanos() as i64;
    let idle = now_ns.saturating_sub(run.last_received_at_ns);
    (run.status == RunStatus::Running && idle > stall).then_some((idle, stall))
}

/// How long the run took, when that exceeds `max_duration`.
fn overruns(run: &ProcessRun, exp: &ProcessExpectations, now_ns: i64) -> Option<(i64, i64)> {
    let max = exp.max_duration?.as_nanos() as i64;
    let end = run.ended_at_ns().unwrap_or(now_ns);
    let took = end.saturating_sub(run.started_at_ns);
    (took > max).then_some((took, max))
}

/// Whether [`check_run`] would change the run (so the tracker copies only those).
pub fn check_run_due(run: &ProcessRun, exp: &ProcessExpectations, now_ns: i64) -> bool {
    stalls(run, exp, now_ns).is_some()
        || (overruns(run, exp, now_ns).is_some() && !run.violations.iter().any(|v| v.rule == "max_duration"))
}

/// Tick-time checks on one run: stall and max duration. Returns whether the
/// run changed.
pub fn check_run(run: &mut ProcessRun, exp: &ProcessExpectations, now_ns: i64) -> bool {
    let mut changed = false;
    if let Some((idle, stall)) = stalls(run, exp, now_ns) {
        run.status = RunStatus::Stalled;
        run.add_violation(Violation {
            rule: "stall_after".into(),
            message: format!("no signal for {} (expected one at least every {})", human(idle), human(stall)),
            at_ns: now_ns,
        });
        changed = true;
    }
    if let Some((took, max)) = overruns(run, exp, now_ns) {
        changed |= run.add_violation(Violation {
            rule: "max_duration".into(),
            message: format!("ran for {}, longer than the expected {}", human(took), human(max)),
            at_ns: now_ns,
        });
    }
    changed
}

/// Signal-time checks: record bounds (max as soon as it is exceeded, min once
/// the run has ended). Returns whether a violation was added.
pub fn check_counts(run: &mut ProcessRun, exp: &ProcessExpectations, now_ns: i64) -> bool {
    let mut changed = false;
    for (outcome, b) in &exp.expected_records {
        let n = run.counts.get(outcome.as_str()).copied().unwrap_or(0.0);
        if let Some(max) = b.max {
            if n > max {
                changed |= run.add_violation(Violation {
                    rule: format!("expected_records.{outcome}.max"),
                    message: format!("{n} {outcome} records, more than the expected maximum of {max}"),
                    at_ns: now_ns,
                });
            }
        }
        if let (Some(min), true) = (b.min, run.status.is_terminal()) {
            if n < min {
                changed |= run.add_violation(Violation {
                    rule: format!("expected_records.{outcome}.min"),
                    message: format!("{n} {outcome} records, fewer than the expected minimum of {min}"),
                    at_ns: now_ns,
                });
            }
        }
    }
    changed
}

/// A duration in plain words: "45s", "12m", "3h 5m", "2d 4h".
pub fn human(ns: i64) -> String {
    let s = ns.max(0) / 1_000_000_000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {}s", s / 60, s % 60),
        3600..=86399 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d {}h", s / 86400, (s % 86400) / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadline_next_occurrence_respects_zone() {
        let d = DeadlineRule::parse(&Deadline { time: "06:00".into(), timezone: "Europe/Berlin".into() }).unwrap();
        // 2026-11-21T12:00:00Z → next 06:00 Berlin (UTC+1 in winter) is 2026-11-22T05:00:00Z.
        let now: Timestamp = "2026-11-21T12:00:00Z".parse().unwrap();
        let next = d.next_after(now.as_nanosecond() as i64);
        let want: Timestamp = "2026-11-22T05:00:00Z".parse().unwrap();
        assert_eq!(next, want.as_nanosecond() as i64);
        assert!(DeadlineRule::parse(&Deadline { time: "06:00".into(), timezone: "Mars/Olympus".into() }).is_err());
        assert!(DeadlineRule::parse(&Deadline { time: "6 o'clock".into(), timezone: "UTC".into() }).is_err());
    }
}
