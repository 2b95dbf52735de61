//! The status page on the daemon's listener (`/`, behind the same token as
//! `/metrics`): for someone with one box and no Prometheus, what `dr info`
//! and the metrics say, on one page readable on a phone. Plain HTML and
//! CSS, no script; the charts are inline SVG drawn from the run history.
//!
//! `http.rs` gathers a [`Page`] (the verdict of `ops::verdict::judge`,
//! the run history, the streams' lag); this module only renders it.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};

use crate::history::Run;

/// Everything the page shows.
#[derive(Debug, Default)]
pub struct Page {
    pub host: String,
    pub version: String,
    pub policies: Vec<PolicyView>,
    /// Secret files and certificates (`ops::rotation`).
    pub keys: Vec<KeyView>,
}

/// One secret file or certificate.
#[derive(Debug)]
pub struct KeyView {
    /// `secret encryption.identity_file` or `certificate s3.example.com:443`.
    pub what: String,
    /// The file, or who talks to the endpoint.
    pub whose: String,
    /// When the secret changed or the certificate expires.
    pub when: Option<DateTime<Utc>>,
    /// Why `when` is unknown, or why the certificate is refused.
    pub note: Option<String>,
    pub at_risk: bool,
}

/// One database (a fleet's database is `fleet/db`).
#[derive(Debug)]
pub struct PolicyView {
    pub name: String,
    pub protected: bool,
    /// (reason word, target, detail) of each risk.
    pub reasons: Vec<(String, Option<String>, String)>,
    pub newest_restorable: Option<DateTime<Utc>>,
    /// What the policy promises (seconds), if anything.
    pub promised_seconds: Option<f64>,
    /// A standby: it reports its follower, not backups.
    pub standby: bool,
    pub targets: Vec<TargetView>,
}

/// One target of a database.
#[derive(Debug)]
pub struct TargetView {
    pub name: String,
    pub last_backup: Option<Run>,
    pub last_drill: Option<Run>,
    /// WAL lag in seconds, for a streamed policy.
    pub lag_seconds: Option<f64>,
    /// Newest first.
    pub failures: Vec<Run>,
    /// Successful backups, newest first (the charts).
    pub backups: Vec<Run>,
}

/// Text for HTML (element content and attribute values).
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// "3 min ago", "2.1 h ago", "5 d ago"; "in 10 d" for what is still to come (a certificate's expiry).
fn ago(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let s = (now - t).num_seconds() as f64;
    if s < 0.0 {
        format!("in {}", human_seconds(-s))
    } else {
        human_seconds(s) + " ago"
    }
}

fn human_seconds(s: f64) -> String {
    if s < 90.0 {
        format!("{s:.0} s")
    } else if s < 5400.0 {
        format!("{:.0} min", s / 60.0)
    } else if s < 172_800.0 {
        format!("{:.1} h", s / 3600.0)
    } else {
        format!("{:.1} d", s / 86400.0)
    }
}

fn bytes(n: u64) -> String {
    let n = n as f64;
    if n < 1024.0 * 1024.0 {
        format!("{:.0} KiB", n / 1024.0)
    } else if n < 1024.0 * 1024.0 * 1024.0 {
        format!("{:.1} MiB", n / 1048576.0)
    } else {
        format!("{:.2} GiB", n / 1073741824.0)
    }
}

fn instant(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    format!(
        "<time datetime=\"{}\">{}</time> <span class=dim>({})</span>",
        t.to_rfc3339(),
        t.format("%Y-%m-%d %H:%M:%S UTC"),
        ago(t, now)
    )
}

/// Bars of stored size, a line of duration, oldest on the left; each bar
/// says its backup in a tooltip.
fn chart(backups: &[Run]) -> String {
    let runs: Vec<&Run> = backups.iter().rev().collect();
    if runs.len() < 2 {
        return String::new();
    }
    let (w, h) = (300.0_f64, 60.0_f64);
    let step = w / runs.len() as f64;
    let max_size = runs.iter().map(|r| r.size).max().unwrap_or(1).max(1) as f64;
    let secs = |r: &Run| (r.finished - r.started).num_milliseconds().max(0) as f64 / 1000.0;
    let max_secs = runs.iter().map(|r| secs(r)).fold(0.0, f64::max).max(0.001);
    let mut svg = format!(
        "<svg class=chart viewBox=\"0 0 {w} {h}\" role=img aria-label=\"stored size (bars) and duration (line) of the last {} backups\">",
        runs.len()
    );
    let mut line = String::new();
    for (i, r) in runs.iter().enumerate() {
        let bh = (r.size as f64 / max_size * (h - 4.0)).max(1.0);
        let x = i as f64 * step;
        let _ = write!(
            svg,
            "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\"><title>{} {}: {}, {:.1} s</title></rect>",
            h - bh,
            (step - 1.0).max(1.0),
            esc(r.label.as_deref().unwrap_or("")),
            esc(&r.kind),
            bytes(r.size),
            secs(r)
        );
        let y = h - secs(r) / max_secs * (h - 4.0) - 2.0;
        let _ = write!(line, "{:.1},{y:.1} ", x + step / 2.0);
    }
    let _ = write!(svg, "<polyline points=\"{}\"/></svg>", line.trim_end());
    svg
}

const STYLE: &str = "
:root{color-scheme:light dark;--ok:#1a7f37;--bad:#cf222e;--dim:#6e7781;--line:#d0d7de}
body{font:15px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:60rem;padding:1rem}
h1{font-size:1.3rem;margin:.2rem 0}h2{font-size:1.1rem;margin:0}
.dim{color:var(--dim)}
section{border:1px solid var(--line);border-radius:8px;padding:.8rem 1rem;margin:.8rem 0}
.verdict{display:inline-block;padding:.1rem .6rem;border-radius:1rem;color:#fff;font-weight:600;font-size:.85rem;margin-left:.4rem}
.protected{background:var(--ok)}.at_risk{background:var(--bad)}
ul.reasons{margin:.4rem 0;padding-left:1.2rem;color:var(--bad)}
table{border-collapse:collapse;width:100%;margin-top:.5rem}
td,th{text-align:left;padding:.25rem .4rem;border-top:1px solid var(--line);vertical-align:top}
th{font-weight:600;white-space:nowrap}
.chart{width:100%;max-width:300px;height:60px}
.chart rect{fill:#54aeff}.chart polyline{fill:none;stroke:#bf8700;stroke-width:1.5}
.fail{color:var(--bad)}
@media (max-width:36rem){td,th{display:block;border:0;padding:.1rem 0}tr{display:block;border-top:1px solid var(--line);padding:.3rem 0}
tr.head{display:none}td[data-label]::before{content:attr(data-label) ': ';color:var(--dim)}}
";

/// The whole page.
pub fn render(page: &Page, now: DateTime<Utc>) -> String {
    let at_risk = page.policies.iter().filter(|p| !p.protected).count();
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html><html lang=en><head><meta charset=utf-8><meta name=viewport content=\"width=device-width,initial-scale=1\"><meta http-equiv=refresh content=60><title>dr: {}</title><style>{STYLE}</style></head><body>",
        if at_risk == 0 {
            "every database protected".to_string()
        } else {
            format!("{at_risk} at risk")
        }
    );
    let _ = write!(
        h,
        "<header><h1>dr on {}</h1><p class=dim>{} database{}, <span id=summary>{}</span> · dr {} · {} · refreshes every minute</p></header>",
        esc(&page.host),
        page.policies.len(),
        if page.policies.len() == 1 { "" } else { "s" },
        if at_risk == 0 {
            "every one protected".to_string()
        } else {
            format!("{at_risk} at risk")
        },
        esc(&page.version),
        now.format("%Y-%m-%d %H:%M:%S UTC")
    );
    // At-risk databases first: they are what the reader came for.
    let mut order: Vec<&PolicyView> = page.policies.iter().collect();
    order.sort_by_key(|p| (p.protected, p.name.clone()));
    for p in order {
        let state = if p.protected { "protected" } else { "at_risk" };
        let _ = write!(
            h,
            "<section id=\"policy-{}\" data-policy=\"{}\" data-state=\"{state}\"><h2>{}<span class=\"verdict {state}\">{}</span></h2>",
            esc(&p.name),
            esc(&p.name),
            esc(&p.name),
            if p.protected { "protected" } else { "at risk" }
        );
        if !p.reasons.is_empty() {
            h.push_str("<ul class=reasons>");
            for (word, target, detail) in &p.reasons {
                let _ = write!(
                    h,
                    "<li><b>{}</b>{}: {}</li>",
                    esc(word),
                    target
                        .as_ref()
                        .map(|t| format!(" on {}", esc(t)))
                        .unwrap_or_default(),
                    esc(detail)
                );
            }
            h.push_str("</ul>");
        }
        let _ = write!(
            h,
            "<p>Newest restorable instant: <span class=restorable>{}</span>{}</p>",
            p.newest_restorable
                .map(|t| instant(t, now))
                .unwrap_or_else(|| "none".into()),
            p.promised_seconds
                .map(|s| format!(
                    " <span class=dim>(promised within {})</span>",
                    human_seconds(s)
                ))
                .unwrap_or_default()
        );
        if p.standby {
            h.push_str("<p class=dim>A standby on this host: it follows its target and takes no backups.</p></section>");
            continue;
        }
        h.push_str("<table><tr class=head><th>target</th><th>last backup</th><th>last drill</th><th>WAL lag</th><th>sizes and durations</th></tr>");
        for t in &p.targets {
            let backup = t.last_backup.as_ref().map_or("none".to_string(), |r| {
                format!(
                    "<span class=label>{}</span> ({}, {}, {:.1} s)<br>{}",
                    esc(r.label.as_deref().unwrap_or("")),
                    esc(&r.kind),
                    bytes(r.size),
                    (r.finished - r.started).num_milliseconds().max(0) as f64 / 1000.0,
                    instant(r.finished, now)
                )
            });
            let drill = t
                .last_drill
                .as_ref()
                .map_or("none passed".to_string(), |r| instant(r.finished, now));
            let lag = t
                .lag_seconds
                .map_or("-".to_string(), |l| format!("{l:.1} s"));
            let _ = write!(
                h,
                "<tr><th>{}</th><td data-label=\"last backup\">{backup}</td><td data-label=\"last drill\">{drill}</td><td data-label=\"WAL lag\">{lag}</td><td>{}</td></tr>",
                esc(&t.name),
                chart(&t.backups)
            );
            for f in &t.failures {
                let _ = write!(
                    h,
                    "<tr class=fail><td></td><td colspan=4>{} failed {}: {}</td></tr>",
                    esc(&f.kind),
                    ago(f.finished, now),
                    esc(f.error.as_deref().unwrap_or(""))
                );
            }
        }
        h.push_str("</table></section>");
    }
    if !page.keys.is_empty() {
        h.push_str("<section id=keys><h2>Keys and certificates</h2><table><tr class=head><th>what</th><th>file or user</th><th>changed or expires</th></tr>");
        for k in &page.keys {
            let _ = write!(
                h,
                "<tr data-at-risk=\"{}\"{}><th>{}</th><td>{}</td><td>{}{}</td></tr>",
                k.at_risk,
                if k.at_risk { " class=fail" } else { "" },
                esc(&k.what),
                esc(&k.whose),
                k.when
                    .map(|t| instant(t, now))
                    .unwrap_or_else(|| "unknown".into()),
                k.note
                    .as_ref()
                    .map(|n| format!("<br><span class=dim>{}</span>", esc(n)))
                    .unwrap_or_default()
            );
        }
        h.push_str("</table></section>");
    }
    h.push_str("<footer class=dim><p>The same verdict as <code>dr info</code> and <code>/healthz</code>; metrics at <code>/metrics</code>.</p></footer></body></html>\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(kind: &str, label: &str, size: u64, secs: i64, ok: bool) -> Run {
        let finished = Utc::now();
        Run {
            policy: "app".into(),
            target: "local".into(),
            kind: kind.into(),
            started: finished - chrono::Duration::seconds(secs),
            finished,
            ok,
            error: (!ok).then(|| "disk <full> & \"more\"".into()),
            label: Some(label.into()),
            size,
        }
    }

    #[test]
    fn names_are_escaped_and_at_risk_comes_first() {
        let page = Page {
            host: "box<1>".into(),
            version: "0.1.0".into(),
            policies: vec![
                PolicyView {
                    name: "a-ok".into(),
                    protected: true,
                    reasons: vec![],
                    newest_restorable: Some(Utc::now()),
                    promised_seconds: Some(7260.0),
                    standby: false,
                    targets: vec![TargetView {
                        name: "local".into(),
                        last_backup: Some(run("full", "L1", 2 << 20, 3, true)),
                        last_drill: None,
                        lag_seconds: Some(0.5),
                        failures: vec![run("diff", "", 0, 1, false)],
                        backups: vec![
                            run("full", "L1", 2 << 20, 3, true),
                            run("diff", "L0", 1 << 20, 1, true),
                        ],
                    }],
                },
                PolicyView {
                    name: "z-bad".into(),
                    protected: false,
                    reasons: vec![("overdue".into(), Some("local".into()), "old".into())],
                    newest_restorable: None,
                    promised_seconds: None,
                    standby: false,
                    targets: vec![],
                },
            ],
            keys: vec![KeyView {
                what: "certificate <s3>:443".into(),
                whose: "target 's3'".into(),
                when: Some(Utc::now() + chrono::Duration::days(10)),
                note: None,
                at_risk: true,
            }],
        };
        let html = render(&page, Utc::now());
        assert!(
            html.contains("certificate &lt;s3&gt;:443") && html.contains("(in 10.0 d)"),
            "{html}"
        );
        assert!(html.contains("box&lt;1&gt;") && !html.contains("box<1>"));
        assert!(html.contains("disk &lt;full&gt; &amp; &quot;more&quot;"));
        assert!(html.find("z-bad").expect("z") < html.find("a-ok").expect("a"));
        assert!(html.contains("<polyline points="), "a chart of two backups");
        assert!(!html.contains("<script"));
    }
}
