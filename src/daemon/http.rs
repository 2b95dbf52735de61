//! `/healthz` and `/metrics` on `daemon.listen` (loopback by default).
//!
//! Health: 200 when every policy's newest backup on every target is within
//! twice its most frequent backup schedule's period and did not fail since,
//! and no WAL spool is full; else 503 with a JSON body naming each problem.

use std::fmt::Write as _;
use std::sync::Arc;

use chrono::Utc;
use serde::Serialize;

use super::{Shared, period};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::history::History;
use crate::sqlite::stream::StreamState;

/// One thing that makes the daemon unhealthy.
#[derive(Debug, Serialize)]
pub struct Problem {
    pub policy: String,
    pub target: String,
    /// `overdue`, `failing`, `verify_failed`, `streamer_down` or `spool_full`.
    pub problem: String,
    pub detail: String,
}

/// The running config and the run history, as one request sees them.
fn snapshot(shared: &Shared) -> Result<(Context, History)> {
    let ctx = shared
        .ctx
        .read()
        .map_err(|_| Error::Other("config lock poisoned".into()))?
        .clone();
    let history = History::open(ctx.state().root())?;
    Ok((ctx, history))
}

/// What is wrong now, by policy and target.
pub fn problems(shared: &Shared) -> Result<Vec<Problem>> {
    let (ctx, history) = snapshot(shared)?;
    let cfg = ctx.cfg();
    let now = Utc::now();
    let mut out = Vec::new();
    for p in &cfg.policies {
        let periods: Vec<chrono::Duration> = [&p.schedule.full, &p.schedule.diff]
            .into_iter()
            .flatten()
            .filter_map(|s| period(s, now))
            .collect();
        // Backups are overdue after twice the most frequent schedule's period.
        let allowed = periods
            .into_iter()
            .min()
            .map(|shortest| shortest * 2 + chrono::Duration::seconds(60));
        for t in p.targets.iter().filter(|_| allowed.is_some()) {
            let allowed = allowed.unwrap_or_default();
            let mut ok = None;
            let mut bad = None;
            for kind in ["full", "diff"] {
                if let Some(r) = history.last(&p.name, t, kind, true)? {
                    ok = Some(ok.map_or(r.finished, |o: chrono::DateTime<Utc>| o.max(r.finished)));
                }
                if let Some(r) = history.last(&p.name, t, kind, false)?
                    && bad
                        .as_ref()
                        .is_none_or(|b: &crate::history::Run| r.finished > b.finished)
                {
                    bad = Some(r);
                }
            }
            if let Some(b) = &bad
                && ok.is_none_or(|o| b.finished > o)
            {
                out.push(Problem {
                    policy: p.name.clone(),
                    target: t.clone(),
                    problem: "failing".into(),
                    detail: b.error.clone().unwrap_or_default(),
                });
            } else if ok.is_none_or(|o| now - o > allowed) {
                out.push(Problem {
                    policy: p.name.clone(),
                    target: t.clone(),
                    problem: "overdue".into(),
                    detail: match ok {
                        Some(o) => format!("newest backup finished {}", o.to_rfc3339()),
                        None => "no successful backup recorded".into(),
                    },
                });
            }
        }
        for t in &p.targets {
            let ok = history.last(&p.name, t, "verify", true)?;
            if let Some(bad) = history.last(&p.name, t, "verify", false)?
                && ok.as_ref().is_none_or(|o| bad.finished > o.finished)
            {
                out.push(Problem {
                    policy: p.name.clone(),
                    target: t.clone(),
                    problem: "verify_failed".into(),
                    detail: bad.error.clone().unwrap_or_default(),
                });
            }
        }
        if p.wal.enabled {
            let status = shared
                .streamers
                .lock()
                .ok()
                .and_then(|s| s.get(&p.name).cloned());
            match status {
                Some(s) if s.up(now) => {}
                Some(s) => out.push(Problem {
                    policy: p.name.clone(),
                    target: "*".into(),
                    problem: "streamer_down".into(),
                    detail: match &s.error {
                        Some(e) if !s.running => format!(
                            "stopped {} s ago after {} restart(s): {e}",
                            (now - s.since).num_seconds(),
                            s.restarts
                        ),
                        Some(e) => format!("restarted {} time(s), last error: {e}", s.restarts),
                        None => "not running".into(),
                    },
                }),
                None => out.push(Problem {
                    policy: p.name.clone(),
                    target: "*".into(),
                    problem: "streamer_down".into(),
                    detail: "no streamer is running for this policy".into(),
                }),
            }
        }
        if p.wal.enabled
            && let Some(st) = StreamState::load(&ctx.state().stream_state(&p.name))
            && st.spool_full
        {
            out.push(Problem {
                policy: p.name.clone(),
                target: "*".into(),
                problem: "spool_full".into(),
                detail: format!("{} bytes spooled of {}", st.spool_bytes, st.spool_max),
            });
        }
    }
    Ok(out)
}

/// The Prometheus text exposition.
pub fn metrics(shared: &Shared) -> Result<String> {
    let (ctx, history) = snapshot(shared)?;
    let cfg = ctx.cfg();
    let mut s = String::new();
    let mut gauge = |name: &str, help: &str, rows: Vec<(String, f64)>| {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (labels, v) in rows {
            let _ = writeln!(s, "{name}{{{labels}}} {v}");
        }
    };
    let mut last_ok = Vec::new();
    let mut last_bad = Vec::new();
    let mut duration = Vec::new();
    let mut size = Vec::new();
    let mut verify = Vec::new();
    let mut lag = Vec::new();
    let mut spool = Vec::new();
    let mut errors = Vec::new();
    for p in &cfg.policies {
        for t in &p.targets {
            for kind in ["full", "diff"] {
                let l = format!("policy=\"{}\",target=\"{t}\",type=\"{kind}\"", p.name);
                if let Some(r) = history.last(&p.name, t, kind, true)? {
                    last_ok.push((l.clone(), r.finished.timestamp() as f64));
                    duration.push((
                        l.clone(),
                        (r.finished - r.started).num_milliseconds() as f64 / 1000.0,
                    ));
                    size.push((l.clone(), r.size as f64));
                }
                if let Some(r) = history.last(&p.name, t, kind, false)? {
                    last_bad.push((l, r.finished.timestamp() as f64));
                }
            }
            if let Some(r) = history.last(&p.name, t, "verify", true)? {
                verify.push((
                    format!("policy=\"{}\",target=\"{t}\"", p.name),
                    r.finished.timestamp() as f64,
                ));
            }
        }
        errors.push((
            format!("policy=\"{}\"", p.name),
            history.failures(&p.name)? as f64,
        ));
        if let Some(st) = StreamState::load(&ctx.state().stream_state(&p.name)) {
            for t in &p.targets {
                if let Some(l) =
                    st.lag(t, Utc::now(), StreamState::stale_after(p.wal.sync_interval))
                {
                    lag.push((format!("policy=\"{}\",target=\"{t}\"", p.name), l));
                }
            }
            spool.push((format!("policy=\"{}\"", p.name), st.spool_bytes as f64));
        }
    }
    gauge(
        "dr_backup_last_success_timestamp_seconds",
        "When the newest successful backup finished.",
        last_ok,
    );
    gauge(
        "dr_backup_last_failure_timestamp_seconds",
        "When the newest failed backup finished.",
        last_bad,
    );
    gauge(
        "dr_backup_duration_seconds",
        "Duration of the newest successful backup.",
        duration,
    );
    gauge(
        "dr_backup_size_bytes",
        "Stored size of the newest successful backup.",
        size,
    );
    gauge(
        "dr_verify_last_success_timestamp_seconds",
        "When the newest passing restore drill finished.",
        verify,
    );
    gauge(
        "dr_wal_lag_seconds",
        "Age of the oldest commit not yet on the target.",
        lag,
    );
    gauge(
        "dr_wal_spool_bytes",
        "WAL segments waiting in the local spool.",
        spool,
    );
    let _ = writeln!(
        s,
        "# HELP dr_errors_total Failed runs recorded.\n# TYPE dr_errors_total counter"
    );
    for (l, v) in errors {
        let _ = writeln!(s, "dr_errors_total{{{l}}} {v}");
    }
    Ok(s)
}

/// Serves the endpoint on its own thread; the returned server stops with `unblock`.
pub fn serve(listen: &str, shared: Arc<Shared>) -> Result<Arc<tiny_http::Server>> {
    let server = Arc::new(tiny_http::Server::http(listen).map_err(|e| {
        Error::Other(format!(
            "cannot listen on {listen} (daemon.listen): {e}: choose a free address"
        ))
    })?);
    let srv = server.clone();
    std::thread::spawn(move || {
        for req in srv.incoming_requests() {
            let (code, body, kind) = match req.url() {
                "/healthz" => match problems(&shared) {
                    Ok(p) if p.is_empty() => {
                        (200, "{\"status\":\"ok\"}".to_string(), "application/json")
                    }
                    Ok(p) => (
                        503,
                        serde_json::json!({"status": "unhealthy", "problems": p}).to_string(),
                        "application/json",
                    ),
                    Err(e) => (
                        500,
                        format!("{{\"error\":{:?}}}", e.to_string()),
                        "application/json",
                    ),
                },
                "/metrics" => match metrics(&shared) {
                    Ok(m) => (200, m, "text/plain; version=0.0.4"),
                    Err(e) => (500, e.to_string(), "text/plain"),
                },
                _ => (
                    404,
                    "not found: try /healthz or /metrics\n".into(),
                    "text/plain",
                ),
            };
            let header = tiny_http::Header::from_bytes(&b"Content-Type"[..], kind.as_bytes());
            let mut resp = tiny_http::Response::from_string(body).with_status_code(code);
            if let Ok(h) = header {
                resp = resp.with_header(h);
            }
            let _ = req.respond(resp);
        }
    });
    Ok(server)
}
