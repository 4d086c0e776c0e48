//! What a `PrefectDeployment` asks of Prefect, decided without I/O: the checks its spec
//! must pass, the body `POST /deployments/` takes (an upsert by flow and name, as
//! `flow.deploy` does), whether Prefect's deployment differs from it, and Prefect's own
//! refusal of a schedule translated to the field that holds it.

use serde_json::{Map, Value, json};

use crate::crd::deployment::{GlobalConcurrencyLimitSpec, PrefectDeploymentSpec, ScheduleSpec};

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
    #[error("spec: set concurrencyLimit or globalConcurrencyLimit, not both")]
    TwoLimits,
    /// Prefect refused a value; `field` is where it is in the spec.
    #[error("{field}: {message} (refused by Prefect)")]
    Refused { field: String, message: String },
}

/// What the spec must hold before anything is sent.
pub fn check(spec: &PrefectDeploymentSpec) -> Result<(), DeploymentSpecError> {
    if spec.work_pool.is_some() == spec.work_pool_ref.is_some() {
        return Err(DeploymentSpecError::Pool);
    }
    if spec.concurrency_limit.is_some() && spec.global_concurrency_limit.is_some() {
        return Err(DeploymentSpecError::TwoLimits);
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
/// `global_limit` is the id of the `globalConcurrencyLimit`, once looked up.
pub fn body(
    spec: &PrefectDeploymentSpec,
    name: &str,
    flow_id: &str,
    pool: &str,
    global_limit: Option<&str>,
) -> Value {
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
            "version_info",
            spec.version_info
                .as_ref()
                .map(|v| json!({"type": v.type_, "version": v.version})),
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
    // Sent even when unset, so that removing one from the spec removes it in Prefect.
    // `concurrency_limit` only without a global limit: Prefect applies it to whatever
    // limit the deployment holds (a shared one's limit changed, or deleted on null).
    match global_limit {
        Some(id) => b["global_concurrency_limit_id"] = json!(id),
        None => b["concurrency_limit"] = json!(spec.concurrency_limit),
    }
    b["concurrency_options"] = match &spec.concurrency_options {
        Some(o) => json!({"collision_strategy": o.collision_strategy.prefect_name(),
                          "grace_period_seconds": o.grace_period_seconds}),
        None => Value::Null,
    };
    b
}

/// The limit Prefect made for the deployment from its `concurrency_limit` (named
/// `deployment:<id>`), as opposed to a shared global one.
fn own_limit(observed: &Value) -> Option<&Value> {
    let limit = observed.get("global_concurrency_limit")?;
    let id = observed["id"].as_str()?;
    (limit["name"].as_str() == Some(format!("deployment:{id}").as_str())).then_some(limit)
}

/// What must happen around the upsert so that Prefect's handling of limits loses
/// nothing: a shared limit is detached before `concurrency_limit` is sent (Prefect would
/// change its limit, or delete it on null), and the deployment's own limit is deleted
/// once a global one replaces it (left behind, its name blocks a later own limit).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LimitSteps {
    pub detach_first: bool,
    pub delete_after: Option<String>,
}

pub fn limit_steps(observed: Option<&Value>, global_limit: Option<&str>) -> LimitSteps {
    let Some(o) = observed else {
        return LimitSteps::default();
    };
    let held = o
        .pointer("/global_concurrency_limit/id")
        .and_then(Value::as_str);
    let own = own_limit(o).is_some();
    LimitSteps {
        detach_first: held.is_some() && !own && global_limit.is_none(),
        // Only a UUID goes into the path of the DELETE.
        delete_after: match (own, global_limit) {
            (true, Some(_)) => held
                .filter(|id| uuid::Uuid::parse_str(id).is_ok())
                .map(str::to_string),
            _ => None,
        },
    }
}

/// The body that creates a global concurrency limit as declared.
pub fn global_limit_body(spec: &GlobalConcurrencyLimitSpec) -> Value {
    json!({
        "name": spec.name,
        "limit": spec.limit.unwrap_or(0),
        "active": spec.active.unwrap_or(true),
        "slot_decay_per_second": spec.slot_decay_per_second.unwrap_or(0.0),
    })
}

/// The fields of an existing global concurrency limit to put back, if the spec declares
/// its limit (without one the limit is only referred to, as found).
pub fn global_limit_drift(spec: &GlobalConcurrencyLimitSpec, observed: &Value) -> Option<Value> {
    spec.limit?;
    let want = global_limit_body(spec);
    let mut patch = Map::new();
    for k in ["limit", "active"] {
        if observed[k] != want[k] {
            patch.insert(k.into(), want[k].clone());
        }
    }
    if observed["slot_decay_per_second"].as_f64() != want["slot_decay_per_second"].as_f64() {
        patch.insert(
            "slot_decay_per_second".into(),
            want["slot_decay_per_second"].clone(),
        );
    }
    (!patch.is_empty()).then_some(Value::Object(patch))
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
            // Prefect answers `concurrency_limit: null` and the limit it made instead.
            "concurrency_limit" => match want.as_u64() {
                Some(n) => own_limit(observed).and_then(|l| l["limit"].as_u64()) == Some(n),
                None => observed["global_concurrency_limit"].is_null(),
            },
            "global_concurrency_limit_id" => {
                observed.pointer("/global_concurrency_limit/id") == Some(want)
            }
            "concurrency_options" => {
                (want.is_null() && have.is_null())
                    || (have["collision_strategy"] == want["collision_strategy"]
                        && (want["grace_period_seconds"].is_null()
                            || have["grace_period_seconds"] == want["grace_period_seconds"]))
            }
            // Prefect server does not keep it (Cloud does): compared where answered.
            "version_info" => observed.get(k).is_none() || have == want,
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
        let want = body(&s, "d", "f", "k8s", None);
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

    /// Prefect's answers as a 3.9 server gives them: a deployment's own limit is named
    /// after it; `concurrency_limit` is always null.
    const L1: &str = "0f6c1b1e-2f9a-4c1b-9d7e-3a5b8c9d0e1f";

    fn answered(id: &str, limit: Option<(&str, &str, u64)>) -> Value {
        let mut a = body(&spec(Vec::new()), "d", "f", "k8s", None);
        a["id"] = json!(id);
        a["concurrency_limit"] = Value::Null;
        a["global_concurrency_limit"] =
            json!(limit.map(|(lid, name, n)| json!({"id": lid, "name": name, "limit": n})));
        a
    }

    #[test]
    fn concurrency_limits_compare_and_switch_without_losing_a_shared_one() {
        let mut s = spec(Vec::new());
        s.concurrency_limit = Some(3);
        let own = answered("d1", Some((L1, "deployment:d1", 3)));
        let shared = answered("d1", Some(("g1", "shared-db", 3)));
        let none = answered("d1", None);
        let want = body(&s, "d", "f", "k8s", None);
        assert!(!drift(&want, &own).contains(&"concurrency_limit".to_string()));
        assert!(
            drift(&want, &shared).contains(&"concurrency_limit".to_string()),
            "a shared limit of 3 is not its own"
        );
        assert!(drift(&want, &none).contains(&"concurrency_limit".to_string()));
        // Own limit wanted while a shared one is held: detached first, or Prefect would
        // set the shared limit to 3.
        assert_eq!(
            limit_steps(Some(&shared), None),
            LimitSteps {
                detach_first: true,
                delete_after: None
            }
        );
        assert_eq!(limit_steps(Some(&own), None), LimitSteps::default());

        s.concurrency_limit = None;
        let want = body(&s, "d", "f", "k8s", None);
        assert_eq!(
            want["concurrency_limit"],
            Value::Null,
            "sent, so that removing it removes it"
        );
        assert!(drift(&want, &own).contains(&"concurrency_limit".to_string()));
        assert!(!drift(&want, &none).contains(&"concurrency_limit".to_string()));
        // None wanted while a shared one is held: detached, never deleted by the null.
        assert!(limit_steps(Some(&shared), None).detach_first);

        let want = body(&s, "d", "f", "k8s", Some("g1"));
        assert!(
            want.get("concurrency_limit").is_none(),
            "Prefect would apply it to the shared limit"
        );
        assert_eq!(drift(&want, &shared), Vec::<String>::new());
        assert_eq!(drift(&want, &own), ["global_concurrency_limit_id"]);
        // From its own limit to a shared one: its own is deleted after the switch.
        assert_eq!(
            limit_steps(Some(&own), Some("g1")),
            LimitSteps {
                detach_first: false,
                delete_after: Some(L1.into())
            }
        );
        assert_eq!(
            limit_steps(Some(&shared), Some("g1")),
            LimitSteps::default()
        );
        assert_eq!(limit_steps(None, Some("g1")), LimitSteps::default());
    }

    #[test]
    fn a_declared_global_limit_is_kept_and_a_referred_one_left_as_found() {
        let mut g = GlobalConcurrencyLimitSpec {
            name: "shared-db".into(),
            ..Default::default()
        };
        let found =
            json!({"name": "shared-db", "limit": 7, "active": true, "slot_decay_per_second": 0.0});
        assert_eq!(global_limit_drift(&g, &found), None, "referred to only");
        g.limit = Some(5);
        assert_eq!(global_limit_drift(&g, &found), Some(json!({"limit": 5})));
        g.limit = Some(7);
        g.slot_decay_per_second = Some(0.5);
        assert_eq!(
            global_limit_drift(&g, &found),
            Some(json!({"slot_decay_per_second": 0.5}))
        );
    }

    #[test]
    fn two_limits_are_refused_and_options_compare() {
        let mut s = spec(Vec::new());
        s.concurrency_limit = Some(1);
        s.global_concurrency_limit = Some(GlobalConcurrencyLimitSpec {
            name: "x".into(),
            ..Default::default()
        });
        assert_eq!(check(&s), Err(DeploymentSpecError::TwoLimits));
        s.global_concurrency_limit = None;
        s.concurrency_options = Some(crate::crd::deployment::ConcurrencyOptionsSpec {
            collision_strategy: crate::crd::deployment::CollisionStrategy::CancelNew,
            grace_period_seconds: None,
        });
        let want = body(&s, "d", "f", "k8s", None);
        let mut have = answered("d1", Some(("l1", "deployment:d1", 1)));
        have["concurrency_options"] =
            json!({"collision_strategy": "ENQUEUE", "grace_period_seconds": null});
        assert_eq!(drift(&want, &have), ["concurrency_options"]);
        have["concurrency_options"]["collision_strategy"] = json!("CANCEL_NEW");
        assert_eq!(drift(&want, &have), Vec::<String>::new());
    }
}
