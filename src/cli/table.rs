//! `dlm status` output: the status report as an aligned table.
//!
//! Pure formatting; asks nothing of the network.

use dlm::client::StatusReport;

/// The status report as an aligned table, then the last fencing number.
pub fn status_table(report: &StatusReport) -> String {
    let mut rows = vec![[
        "LOCK".to_owned(),
        "HOLDER".to_owned(),
        "FENCE".to_owned(),
        "LEASE LEFT".to_owned(),
        "STAGED".to_owned(),
        "WAITERS".to_owned(),
    ]];
    for lock in &report.locks {
        let waiters: Vec<String> = lock
            .waiters
            .iter()
            .map(|w| {
                if w.detached {
                    format!("{} (cut off)", w.client_id)
                } else {
                    w.client_id.to_string()
                }
            })
            .collect();
        rows.push([
            format!("{:?}", lock.name),
            lock.holder.map_or("-".to_owned(), |h| h.to_string()),
            if lock.holder.is_some() {
                lock.fence.to_string()
            } else {
                "-".to_owned()
            },
            if lock.holder.is_some() {
                format!("{:.1}s", lock.lease_left.as_secs_f64())
            } else {
                "-".to_owned()
            },
            lock.staged_appends.to_string(),
            if waiters.is_empty() {
                "-".to_owned()
            } else {
                waiters.join(", ")
            },
        ]);
    }
    let mut widths = [0; 6];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    if report.locks.is_empty() {
        out.push_str("no lock is held or awaited\n");
    } else {
        for row in &rows {
            let cells: Vec<String> = row
                .iter()
                .zip(widths)
                .map(|(cell, width)| format!("{cell:<width$}"))
                .collect();
            out.push_str(cells.join("  ").trim_end());
            out.push('\n');
        }
    }
    out.push_str(&format!("last fencing number: {}\n", report.last_fence));
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use dlm::client::{LockStatus, WaiterStatus};

    use super::*;

    #[test]
    fn the_status_table_lines_up() {
        let report = StatusReport {
            locks: vec![
                LockStatus {
                    name: String::new(),
                    holder: Some(1),
                    fence: 7,
                    lease_left: Duration::from_millis(29_512),
                    waiters: vec![
                        WaiterStatus {
                            client_id: 2,
                            detached: false,
                        },
                        WaiterStatus {
                            client_id: 3,
                            detached: true,
                        },
                    ],
                    staged_appends: 2,
                },
                LockStatus {
                    name: "jobs".into(),
                    holder: None,
                    fence: 0,
                    lease_left: Duration::ZERO,
                    waiters: vec![],
                    staged_appends: 0,
                },
            ],
            last_fence: 9,
        };
        let expected = "\
LOCK    HOLDER  FENCE  LEASE LEFT  STAGED  WAITERS
\"\"      1       7      29.5s       2       2, 3 (cut off)
\"jobs\"  -       -      -           0       -
last fencing number: 9
";
        assert_eq!(status_table(&report), expected);
        let empty = StatusReport {
            locks: vec![],
            last_fence: 0,
        };
        assert_eq!(
            status_table(&empty),
            "no lock is held or awaited\nlast fencing number: 0\n"
        );
    }
}
