//! What a `PrefectDeployment` asks of Prefect, decided without I/O: the checks its spec
//! must pass, the body `POST /deployments/` takes (an upsert by flow and name, as
//! `flow.deploy` does), whether Prefect's deployment differs from it, and Prefect's own
//! refusal of a schedule translated to the field that holds it.

use serde_json::{Map, Value, json};

use crate::crd::deployment::{PrefectDeploymentSpec, ScheduleSpec};

/// Why a deployment cannot be synced as declared; each names the field to fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeploymentSpecError {
    #[error("spec: set workPool or workPoolRef (one of them)")]
    Pool,
    #[error("spec.schedules[{0}]: set exactly one of interval, cron, rrule")]
    ScheduleKind(usize),
    #[error("spec.schedules[{index}].{field}: {problem}")]
    Schedule {
        index: usize,
        field: &'static str,
        problem: String,
    },
    /// Prefect refused a value; `field` is where it is in the spec.
    #[error("{field}: {message} (refused by Prefect)")]
    Refused { field: String, message: String },
}

/// What the spec must hold before anything is sent.
pub fn check(spec: &PrefectDeploymentSpec) -> Result<(), DeploymentSpecError> {
    if spec.work_pool.is_some() == spec.work_pool_ref.is_some() {
        return Err(DeploymentSpecError::Pool);
    }
    for (i, s) in spec.schedules.iter().enumerate() {
        let kinds = [s.interval.is_some(), s.cron.is_some(), s.rrule.is_some()];
        if kinds.iter().filter(|k| **k).count() != 1 {
            return Err(DeploymentSpecError::ScheduleKind(i));
        }
        if s.anchor_date.is_some() && s.interval.is_none() {
            return Err(DeploymentSpecError::Schedule {
                index: i,
                field: "anchorDate",
                problem: "only an interval schedule has an anchor date".into(),
            });
        }
        if let Some(anchor) = &s.anchor_date
            && anchor.parse::<k8s_openapi::jiff::Timestamp>().is_err()
        {
            return Err(DeploymentSpecError::Schedule {
                index: i,
                field: "anchorDate",
                problem: format!("{anchor:?} is not an RFC 3339 time (e.g. 2026-01-01T06:00:00Z)"),
            });
        }
        if s.day_or.is_some() && s.cron.is_none() {
            return Err(DeploymentSpecError::Schedule {
                index: i,
                field: "dayOr",
                problem: "only a cron schedule has dayOr".into(),
            });
        }
    }
    Ok(())
}

/// One schedule as Prefect takes it.
fn schedule(s: &ScheduleSpec) -> Value {
    let mut inner = Map::new();
    if let Some(i) = s.interval {
        inner.insert("interval".into(), json!(i));
    }
    if let Some(c) = &s.cron {
        inner.insert("cron".into(), json!(c));
    }
    if let Some(r) = &s.rrule {
        inner.insert("rrule".into(), json!(r));
    }
    for (k, v) in [("timezone", &s.timezone), ("anchor_date", &s.anchor_date)] {
        if let Some(v) = v {
            inner.insert(k.into(), json!(v));
        }
    }
    if let Some(d) = s.day_or {
        inner.insert("day_or".into(), json!(d));
    }
    let mut out = json!({"schedule": inner, "active": s.active.unwrap_or(true)});
    if let Some(m) = s.max_scheduled_runs {
        out["max_scheduled_runs"] = json!(m);
    }
    out
}

/// The body of `POST /deployments/` (created, or updated in place by flow and name).
pub fn body(spec: &PrefectDeploymentSpec, name: &str, flow_id: &str, pool: &str) -> Value {
    let mut b = json!({
        "name": name,
        "flow_id": flow_id,
        "work_pool_name": pool,
        "paused": spec.paused,
        "schedules": spec.schedules.iter().map(schedule).collect::<Vec<_>>(),
        "tags": spec.tags,
        "pull_steps": spec.pull_steps,
        "parameters": spec.parameters.clone().unwrap_or_else(|| json!({})),
        "job_variables": spec.job_variables.clone().unwrap_or_else(|| json!({})),
    });
    let optional = [
        (
            "work_queue_name",
            spec.work_queue.as_ref().map(|v| json!(v)),
        ),
        ("entrypoint", spec.entrypoint.as_ref().map(|v| json!(v))),
        ("path", spec.path.as_ref().map(|v| json!(v))),
        ("version", spec.version.as_ref().map(|v| json!(v))),
        ("description", spec.description.as_ref().map(|v| json!(v))),
        (
            "parameter_openapi_schema",
            spec.parameter_openapi_schema.clone(),
        ),
        (
            "enforce_parameter_schema",
            spec.enforce_parameter_schema.map(|v| json!(v)),
        ),
        (
            "concurrency_limit",
            spec.concurrency_limit.map(|v| json!(v)),
        ),
        (
            "labels",
            (!spec.labels.is_empty()).then(|| json!(spec.labels)),
        ),
    ];
    for (k, v) in optional {
        if let Some(v) = v {
            b[k] = v;
        }
    }
    b
}

/// Where Prefect's deployment differs from `desired` (a body from [`body`]), field by
/// field; empty when they agree. Only what the spec sets is compared: Prefect fills in
/// the rest (a default queue, its own labels, a schedule's defaults).
pub fn drift(desired: &Value, observed: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for (k, want) in desired.as_object().into_iter().flatten() {
        let have = observed.get(k).unwrap_or(&Value::Null);
        let same = match k.as_str() {
            "name" | "flow_id" => true,
            "schedules" => same_schedules(want, have),
            "labels" => want
                .as_object()
                .into_iter()
                .flatten()
                .all(|(l, v)| have.get(l) == Some(v)),
            "concurrency_limit" => {
                have == want || observed.pointer("/global_concurrency_limit/limit") == Some(want)
            }
            _ => have == want,
        };
        if !same {
            out.push(k.clone());
        }
    }
    out
}

/// Schedules compare by what was declared: kind and value, then whatever the declared
/// one sets (an interval of 3600 is Prefect's 3600.0).
fn same_schedules(want: &Value, have: &Value) -> bool {
    let (Some(want), Some(have)) = (want.as_array(), have.as_array()) else {
        return want == have;
    };
    want.len() == have.len()
        && want.iter().all(|w| {
            have.iter().any(|h| {
                let (ws, hs) = (&w["schedule"], &h["schedule"]);
                let fields_match =
                    ws.as_object()
                        .into_iter()
                        .flatten()
                        .all(|(k, v)| match k.as_str() {
                            "interval" => hs[k].as_f64() == v.as_f64(),
                            "anchor_date" => same_time(&hs[k], v),
                            _ => &hs[k] == v,
                        });
                fields_match
                    && h["active"] == w["active"]
                    && (w.get("max_scheduled_runs").is_none()
                        || h["max_scheduled_runs"] == w["max_scheduled_runs"])
            })
        })
}

fn same_time(a: &Value, b: &Value) -> bool {
    let t = |v: &Value| {
        v.as_str()
            .and_then(|s| s.parse::<k8s_openapi::jiff::Timestamp>().ok())
    };
    t(a).is_some() && t(a) == t(b)
}

/// Prefect's 422 for a deployment body, translated: the first entry that says what is
/// wrong (not a union member's "field required"), at the spec field that holds it.
pub fn refused(body: &Value) -> Option<DeploymentSpecError> {
    let entries = body["exception_detail"]
        .as_array()
        .or_else(|| body["detail"].as_array())?;
    let entry = entries
        .iter()
        .find(|e| e["type"] == "value_error")
        .or_else(|| {
            entries
                .iter()
                .find(|e| e["type"] != "missing" && e["type"] != "extra_forbidden")
        })?;
    let loc: Vec<&Value> = entry["loc"].as_array()?.iter().collect();
    let field = spec_field(&loc);
    let message = entry["msg"]
        .as_str()
        .unwrap_or("refused")
        .trim_start_matches("Value error, ")
        .to_string();
    // The union's member names (`CronSchedule`) are no field: say which value it was.
    let field = match (field.ends_with(']'), entry["input"].as_object()) {
        (true, Some(input)) => {
            let key = ["cron", "rrule", "interval"]
                .into_iter()
                .find(|k| input.contains_key(*k));
            let zone = message.contains("timezone");
            match (zone, key) {
                (true, _) => format!("{field}.timezone"),
                (false, Some(k)) => format!("{field}.{k}"),
                _ => field,
            }
        }
        _ => field,
    };
    Some(DeploymentSpecError::Refused { field, message })
}

/// `["body", "schedules", 0, "schedule", "CronSchedule", "cron"]` → `spec.schedules[0].cron`.
fn spec_field(loc: &[&Value]) -> String {
    let camel = |s: &str| {
        let mut out = String::new();
        let mut upper = false;
        for c in s.chars() {
            match (c, upper) {
                ('_', _) => upper = true,
                (c, true) => {
                    out.extend(c.to_uppercase());
                    upper = false;
                }
                (c, false) => out.push(c),
            }
        }
        out
    };
    let mut out = "spec".to_string();
    for p in loc.iter().skip_while(|p| p.as_str() == Some("body")) {
        match (p.as_u64(), p.as_str()) {
            (Some(i), _) => out.push_str(&format!("[{i}]")),
            // Prefect's schedule wrapper and its union members are not spec fields.
            (_, Some("schedule")) => {}
            (_, Some(s)) if s.contains("Schedule") => {}
            (_, Some(s)) => {
                out.push('.');
                out.push_str(&camel(s));
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(schedules: Vec<ScheduleSpec>) -> PrefectDeploymentSpec {
        PrefectDeploymentSpec {
            flow_name: "hello".into(),
            work_pool: Some("k8s".into()),
            schedules,
            ..PrefectDeploymentSpec::default()
        }
    }

    #[test]
    fn schedules_name_the_field_that_is_wrong() {
        let two = ScheduleSpec {
            interval: Some(60),
            cron: Some("* * * * *".into()),
            ..ScheduleSpec::default()
        };
        assert_eq!(
            check(&spec(vec![ScheduleSpec::default(), two]))
                .unwrap_err()
                .to_string(),
            "spec.schedules[0]: set exactly one of interval, cron, rrule"
        );
        let anchored_cron = ScheduleSpec {
            cron: Some("0 6 * * *".into()),
            anchor_date: Some("2026-01-01T00:00:00Z".into()),
            ..ScheduleSpec::default()
        };
        assert_eq!(
            check(&spec(vec![anchored_cron])).unwrap_err().to_string(),
            "spec.schedules[0].anchorDate: only an interval schedule has an anchor date"
        );
        let bad_anchor = ScheduleSpec {
            interval: Some(60),
            anchor_date: Some("yesterday".into()),
            ..ScheduleSpec::default()
        };
        assert!(check(&spec(vec![bad_anchor])).is_err());
        let mut both = spec(vec![]);
        both.work_pool_ref = Some(crate::crd::LocalObjectRef { name: "p".into() });
        assert_eq!(check(&both), Err(DeploymentSpecError::Pool));
    }

    #[test]
    fn prefect_s_refusal_is_said_at_the_spec_field() {
        let cron = r#"{"exception_detail":[
            {"type":"missing","loc":["body","schedules",0,"schedule","IntervalSchedule","interval"],"msg":"Field required","input":{}},
            {"type":"value_error","loc":["body","schedules",0,"schedule","function-after[validate_timezone(), CronSchedule]","cron"],"msg":"Value error, Invalid cron string: \"61 * * * *\"","input":"61 * * * *"}]}"#;
        assert_eq!(
            refused(&serde_json::from_str(cron).unwrap())
                .unwrap()
                .to_string(),
            "spec.schedules[0].cron: Invalid cron string: \"61 * * * *\" (refused by Prefect)"
        );
        let zone = r#"{"exception_detail":[
            {"type":"value_error","loc":["body","schedules",1,"schedule","function-after[validate_timezone(), CronSchedule]"],"msg":"Value error, Invalid timezone: \"Mars/Base\"","input":{"cron":"0 * * * *","timezone":"Mars/Base"}}]}"#;
        assert_eq!(
            refused(&serde_json::from_str(zone).unwrap())
                .unwrap()
                .to_string(),
            "spec.schedules[1].timezone: Invalid timezone: \"Mars/Base\" (refused by Prefect)"
        );
        let params = r#"{"detail":[{"type":"dict_type","loc":["body","parameter_openapi_schema"],"msg":"Input should be a valid dictionary"}]}"#;
        assert_eq!(
            refused(&serde_json::from_str(params).unwrap())
                .unwrap()
                .to_string(),
            "spec.parameterOpenapiSchema: Input should be a valid dictionary (refused by Prefect)"
        );
        assert_eq!(refused(&json!("not an answer")), None);
    }

    #[test]
    fn drift_compares_what_the_spec_sets() {
        let mut s = spec(vec![ScheduleSpec {
            interval: Some(3600),
            ..ScheduleSpec::default()
        }]);
        s.labels = [("team".to_string(), "data".to_string())].into();
        let want = body(&s, "d", "f", "k8s");
        let mut have = want.clone();
        have["schedules"] = json!([{"schedule": {"interval": 3600.0, "timezone": "UTC",
            "anchor_date": "2026-01-01T00:00:00Z"}, "active": true, "max_scheduled_runs": null}]);
        have["labels"] = json!({"team": "data", "prefect.flow.id": "f"});
        have["work_queue_name"] = json!("default");
        assert_eq!(drift(&want, &have), Vec::<String>::new());
        have["paused"] = json!(true);
        have["schedules"][0]["schedule"]["interval"] = json!(60.0);
        assert_eq!(drift(&want, &have), ["paused", "schedules"]);
    }
}
