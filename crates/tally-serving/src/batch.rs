//! `/v1/admin/batch`: start a run, watch it, discard a bad view.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
pub use tally_batch::Trigger;
use tally_batch::{RunError, RunOutcome};
use tally_core::format_rfc3339;
use tally_master::Forget;

use crate::error::{ApiError, ApiResult};
use crate::extract::{flag, params, Params};
use crate::state::AppState;
use crate::views::DiscardError;

fn wants_wait(q: &std::collections::HashMap<String, String>) -> ApiResult<bool> {
    flag(q, "wait", false)
}

fn outcome_json(o: &RunOutcome) -> Value {
    json!({
        "run_id": o.run_id,
        "version": o.version,
        "cutoff_seq": o.cutoff_seq.get(),
        "events": o.events,
        "urls": o.urls,
        "duration_ms": o.duration_ms,
        "files": o.files,
        "files_reused": o.files_reused,
        "files_computed": o.files_computed,
        "full": o.full,
        "timings": o.timings,
    })
}

fn run_error(e: RunError) -> ApiError {
    match e {
        RunError::AlreadyRunning { run_id } => ApiError::Conflict {
            message: "A batch run is already going; wait for it to finish.".into(),
            run_id,
        },
        RunError::HeldElsewhere { node, run_id } => ApiError::Conflict {
            message: format!(
                "Node {node} is running a batch run (it holds the cluster's batch lease); wait for it to finish."
            ),
            run_id,
        },
        RunError::Unavailable(why) => ApiError::Unavailable(format!(
            "Cannot start a batch run: whether another node is running one cannot be known now ({why})."
        )),
        RunError::Failed { run_id, source } => {
            ApiError::Internal(format!("batch run {run_id} failed: {source}"))
        }
    }
}

/// Awaits a started run and, once its view is `CURRENT`, swaps it in for serving.
async fn finish(state: &AppState, started: tally_batch::StartedRun) -> ApiResult<RunOutcome> {
    let result = started.handle.await.map_err(ApiError::internal)?;
    crate::metrics::record_run(&result);
    let outcome = result.map_err(run_error)?;
    state.views.refresh().await;
    Ok(outcome)
}

async fn start(state: &AppState, trigger: Trigger, full: bool, wait: bool) -> ApiResult<Response> {
    let started = state
        .runner
        .start_with(trigger, full)
        .await
        .map_err(run_error)?;
    if wait {
        let outcome = finish(state, started).await?;
        return Ok((StatusCode::OK, Json(outcome_json(&outcome))).into_response());
    }
    let run_id = started.run_id.clone();
    let s = state.clone();
    tokio::spawn(async move {
        if let Err(e) = finish(&s, started).await {
            tracing::error!(error = ?e, "batch run failed");
        }
    });
    Ok((StatusCode::ACCEPTED, Json(json!({ "run_id": run_id }))).into_response())
}

pub(crate) async fn post_batch(State(state): State<AppState>, q: Params) -> ApiResult<Response> {
    let q = params(q)?;
    let wait = wants_wait(&q)?;
    let full = flag(&q, "full", false)?;
    start(&state, Trigger::Admin, full, wait).await
}

/// `POST /v1/admin/batch/discard[?version=V][&wait=true]`: discards the serving view (or
/// version `V`), serves the newest earlier good one, and reruns the batch layer. The view
/// manager keeps rerunning (with backoff) until a newer view serves exactly; the run started
/// here is the first attempt.
pub(crate) async fn post_discard(State(state): State<AppState>, q: Params) -> ApiResult<Response> {
    let q = params(q)?;
    let wait = wants_wait(&q)?;
    let version = match q.get("version").map(|v| v.trim()) {
        None => None,
        Some("") => return Err(ApiError::bad("version must not be empty.")),
        Some(v) => Some(v.to_string()),
    };
    let d = state
        .views
        .discard(version, "discarded by an operator")
        .await
        .map_err(|e| match e {
            DiscardError::NoSuchVersion(_) => ApiError::NotFound(e.to_string()),
            DiscardError::AlreadyDiscarded(_) => ApiError::bad(e.to_string()),
            DiscardError::Store(e) => ApiError::internal(e),
        })?;
    let mut body = json!({ "discarded": d.version, "serving": d.serving });
    match d.rerun {
        Ok(started) => {
            body["run_id"] = json!(started.run_id);
            if wait {
                let outcome = finish(&state, started).await?;
                let mut out = outcome_json(&outcome);
                out["discarded"] = body["discarded"].take();
                out["serving"] = json!(state.views.current().map(|v| v.version.clone()));
                return Ok((StatusCode::OK, Json(out)).into_response());
            }
            let s = state.clone();
            tokio::spawn(async move {
                if let Err(e) = finish(&s, started).await {
                    tracing::error!(error = ?e, "rerun after discard failed; the view manager retries");
                }
            });
        }
        // The run going now publishes the new view (the view manager checks that it does).
        Err(RunError::AlreadyRunning { run_id }) => body["run_id"] = json!(run_id),
        // The discard has taken effect: the view manager reruns until a newer view serves
        // (cluster mode: this node computes to the next cut it follows).
        Err(e) => body["note"] = json!(rerun_note(&e)),
    }
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

/// Why no run started right after a discard or a deletion request that took effect anyway.
fn rerun_note(e: &RunError) -> String {
    match e {
        RunError::AlreadyRunning { run_id } | RunError::HeldElsewhere { run_id, .. } => format!(
            "Batch run {run_id} was going and may still count what was removed; run the batch layer again once it is done."
        ),
        e => format!("No batch run started now ({e}); run the batch layer again."),
    }
}

/// What a deletion request names: `url_prefix` (a normalised URL's start, with its scheme and
/// host) or `visitor`, exactly one.
fn forget_of(q: &std::collections::HashMap<String, String>) -> ApiResult<Forget> {
    let named = match (q.get("url_prefix"), q.get("visitor")) {
        (Some(p), None) => Forget::url_prefix(p),
        (None, Some(v)) => Forget::visitor(v),
        _ => {
            return Err(ApiError::bad(
                "Name exactly one of url_prefix and visitor to forget.",
            ))
        }
    };
    named.map_err(ApiError::bad)
}

/// `POST /v1/admin/forget?url_prefix=P|visitor=V[&wait=true]`: a deletion request. Rewrites
/// the master files holding matching events without them, then runs the batch layer so that
/// the views stop counting them (with `wait`, answers once that view serves).
pub(crate) async fn post_forget(State(state): State<AppState>, q: Params) -> ApiResult<Response> {
    let q = params(q)?;
    let wait = wants_wait(&q)?;
    let forget = forget_of(&q)?;
    let (files, events) = match &state.log {
        None => state.master.forget(&forget).await?,
        // Cluster mode: through the log, so every node drops the same events (this node's
        // counts are answered).
        Some(log) => {
            let n = log.publish_forget(&forget).await?;
            // In the log, it will be applied everywhere: from here on the answer is a 202.
            let applied = match log
                .wait_followed(n, std::time::Duration::from_secs(60))
                .await
            {
                Ok(()) => log.forgotten(n),
                Err(_) => None,
            };
            match applied {
                Some(counts) => counts,
                None => {
                    let body = json!({
                        "log_seq": n,
                        "note": format!(
                            "The deletion request is log message {n}: every node applies it as it reads the log, this one has not yet (see /v1/admin/status); run the batch layer once it has."
                        ),
                    });
                    return Ok((StatusCode::ACCEPTED, Json(body)).into_response());
                }
            }
        }
    };
    let started = state.runner.start_with(Trigger::Admin, false).await;
    let mut body = json!({ "files_rewritten": files, "events_dropped": events });
    match started {
        Ok(started) if wait => {
            let outcome = finish(&state, started).await?;
            let mut out = outcome_json(&outcome);
            out["files_rewritten"] = body["files_rewritten"].take();
            out["events_dropped"] = body["events_dropped"].take();
            return Ok((StatusCode::OK, Json(out)).into_response());
        }
        Ok(started) => {
            body["run_id"] = json!(started.run_id);
            let s = state.clone();
            tokio::spawn(async move {
                if let Err(e) = finish(&s, started).await {
                    tracing::error!(error = ?e, "batch run after a deletion request failed");
                }
            });
        }
        // A run going now may have read the files before they were rewritten: the next run
        // counts without the forgotten events. Either way the events are gone from the files.
        Err(e) => body["note"] = json!(rerun_note(&e)),
    }
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

pub(crate) async fn get_batch(State(state): State<AppState>) -> Json<Value> {
    let current = state.views.current().map(|v| {
        json!({
            "version": v.version,
            "cutoff_seq": v.cutoff_seq.get(),
            "computed_at": format_rfc3339(v.computed_at_ms),
            "events": v.events,
            "urls": v.urls,
        })
    });
    let running = state.runner.running().map(|r| {
        json!({
            "run_id": r.run_id,
            "started_at": format_rfc3339(r.started_at_ms),
            "trigger": r.trigger,
            "full": r.full,
            "progress": r.progress(),
        })
    });
    let next = state.next_run_ms.load(std::sync::atomic::Ordering::Relaxed);
    Json(json!({
        "current": current,
        "running": running,
        "history": state.runner.history(),
        "schedule": state.schedule,
        "next_run": (next > 0).then(|| format_rfc3339(next)),
    }))
}

/// Cluster mode: computes this node's own view to every epoch cut it follows in the log
/// (`cuts`: the last cut written, from `tally_log::Log::cuts`), so that every node serves a view
/// with the same cutoff whichever node's run published it. A cut that arrives while a run is
/// going waits for it (the run may already cover it); cuts that arrive together are one run, to
/// the last. Runs until the process ends.
pub async fn follow_cuts(state: AppState, mut cuts: tokio::sync::watch::Receiver<tally_core::Seq>) {
    let cfg = state.runner.config().clone();
    let mut delay = cfg.retry_backoff;
    loop {
        let cut = *cuts.borrow_and_update();
        // A run that just ended has published its view before anyone swapped it in.
        let serving = state
            .views
            .current()
            .map_or(tally_core::Seq::ZERO, |v| v.cutoff_seq);
        let covered = serving.max(state.runner.published_cutoff());
        if cut <= covered {
            if cuts.changed().await.is_err() {
                return;
            }
            continue;
        }
        if state.runner.wait_idle().await {
            continue;
        }
        let result = state.runner.run_at(Trigger::Log, cut).await;
        crate::metrics::record_run(&result);
        match result {
            Ok(_) => {
                delay = cfg.retry_backoff;
                state.views.refresh().await;
            }
            Err(RunError::AlreadyRunning { .. }) => {}
            Err(e) => {
                tracing::error!(error = %e, cutoff_seq = cut.get(), retry_in_ms = delay.as_millis() as u64,
                    "batch run to a cut from the log failed");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(cfg.max_backoff);
            }
        }
    }
}

/// A scheduled run: retried with backoff; a run already going is left alone.
pub async fn scheduled_run(state: AppState) {
    run_in_background(state, Trigger::Schedule).await;
}

async fn run_in_background(state: AppState, trigger: Trigger) {
    let result = state.runner.run_with_retries(trigger).await;
    crate::metrics::record_run(&result);
    match result {
        Ok(_) => state.views.refresh().await,
        Err(RunError::AlreadyRunning { run_id }) => {
            tracing::info!(%run_id, ?trigger, "batch run skipped: another run is going");
        }
        Err(RunError::HeldElsewhere { node, run_id }) => {
            tracing::info!(%node, %run_id, ?trigger, "batch run skipped: another node is running one");
        }
        Err(e) => {
            tracing::error!(error = %e, ?trigger, "batch run failed after retries; the old view keeps serving");
        }
    }
}
