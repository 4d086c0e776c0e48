//! The pod policy the operator holds every flow-run pod to: Kubernetes' Pod Security
//! Standards (`privileged`, `baseline`, `restricted`), checked on what a resource's `job`
//! section and a run's job variables produce. Whoever may create a PrefectAgent must not
//! thereby get a host-network, privileged or host-mounting pod.

use k8s_openapi::api::core::v1::{Container, PodSpec, SecurityContext};
use serde::{Deserialize, Serialize};

/// A Pod Security Standard level (`--pod-security`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PodSecurity {
    /// Anything goes.
    Privileged,
    /// No host namespaces, host paths, host ports, privileged containers or added
    /// capabilities beyond the default set (the default).
    #[default]
    Baseline,
    /// Baseline, and non-root, no privilege escalation, all capabilities dropped,
    /// a RuntimeDefault or Localhost seccomp profile, and only ephemeral-kind volumes.
    Restricted,
}

impl PodSecurity {
    pub fn name(self) -> &'static str {
        match self {
            Self::Privileged => "privileged",
            Self::Baseline => "baseline",
            Self::Restricted => "restricted",
        }
    }
}

/// Capabilities the baseline standard allows a container to add.
const BASELINE_CAPABILITIES: [&str; 13] = [
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
];

/// Sysctls the baseline standard allows.
const SAFE_SYSCTLS: [&str; 5] = [
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
];

/// The fields of `pod` that `level` refuses, as `field: why` (empty when it complies).
pub fn violations(pod: &PodSpec, level: PodSecurity) -> Vec<String> {
    let mut out = Vec::new();
    if level == PodSecurity::Privileged {
        return out;
    }
    let mut refuse = |field: String, why: &str| out.push(format!("{field}: {why}"));
    for (flag, field) in [
        (pod.host_network, "hostNetwork"),
        (pod.host_pid, "hostPID"),
        (pod.host_ipc, "hostIPC"),
    ] {
        if flag == Some(true) {
            refuse(field.into(), "host namespaces are not allowed");
        }
    }
    for (i, v) in pod.volumes.iter().flatten().enumerate() {
        if v.host_path.is_some() {
            refuse(
                format!("volumes[{i}].hostPath"),
                "host paths are not allowed",
            );
        }
    }
    if let Some(sc) = &pod.security_context {
        for (i, s) in sc.sysctls.iter().flatten().enumerate() {
            if !SAFE_SYSCTLS.contains(&s.name.as_str()) {
                refuse(format!("securityContext.sysctls[{i}]"), "an unsafe sysctl");
            }
        }
        if sc
            .seccomp_profile
            .as_ref()
            .is_some_and(|p| p.type_ == "Unconfined")
        {
            refuse("securityContext.seccompProfile".into(), "Unconfined");
        }
    }
    for (i, c) in pod.containers.iter().enumerate() {
        container_violations(&format!("containers[{i}]"), c, level, &mut refuse);
    }
    for (i, c) in pod.init_containers.iter().flatten().enumerate() {
        container_violations(&format!("initContainers[{i}]"), c, level, &mut refuse);
    }
    if level == PodSecurity::Restricted {
        restricted_pod_violations(pod, &mut refuse);
    }
    out
}

fn container_violations(
    at: &str,
    c: &Container,
    level: PodSecurity,
    refuse: &mut impl FnMut(String, &str),
) {
    for (j, p) in c.ports.iter().flatten().enumerate() {
        if p.host_port.is_some_and(|h| h != 0) {
            refuse(
                format!("{at}.ports[{j}].hostPort"),
                "host ports are not allowed",
            );
        }
    }
    let Some(sc) = &c.security_context else {
        if level == PodSecurity::Restricted {
            refuse(
                format!("{at}.securityContext"),
                "restricted needs allowPrivilegeEscalation: false and capabilities.drop: [ALL]",
            );
        }
        return;
    };
    if sc.privileged == Some(true) {
        refuse(
            format!("{at}.securityContext.privileged"),
            "privileged containers are not allowed",
        );
    }
    if sc.proc_mount.as_deref().is_some_and(|m| m != "Default") {
        refuse(format!("{at}.securityContext.procMount"), "only Default");
    }
    if sc
        .seccomp_profile
        .as_ref()
        .is_some_and(|p| p.type_ == "Unconfined")
    {
        refuse(format!("{at}.securityContext.seccompProfile"), "Unconfined");
    }
    for cap in sc
        .capabilities
        .as_ref()
        .and_then(|c| c.add.as_ref())
        .into_iter()
        .flatten()
    {
        let allowed = match level {
            PodSecurity::Restricted => cap == "NET_BIND_SERVICE",
            _ => BASELINE_CAPABILITIES.contains(&cap.as_str()),
        };
        if !allowed {
            refuse(
                format!("{at}.securityContext.capabilities.add"),
                &format!("adding {cap} is not allowed"),
            );
        }
    }
    if level == PodSecurity::Restricted {
        restricted_container_violations(at, sc, refuse);
    }
}

fn restricted_container_violations(
    at: &str,
    sc: &SecurityContext,
    refuse: &mut impl FnMut(String, &str),
) {
    if sc.allow_privilege_escalation != Some(false) {
        refuse(
            format!("{at}.securityContext.allowPrivilegeEscalation"),
            "must be false",
        );
    }
    let drops_all = sc
        .capabilities
        .as_ref()
        .and_then(|c| c.drop.as_ref())
        .is_some_and(|d| d.iter().any(|x| x == "ALL"));
    if !drops_all {
        refuse(
            format!("{at}.securityContext.capabilities.drop"),
            "must include ALL",
        );
    }
    if sc.run_as_user == Some(0) {
        refuse(format!("{at}.securityContext.runAsUser"), "must not be 0");
    }
}

fn restricted_pod_violations(pod: &PodSpec, refuse: &mut impl FnMut(String, &str)) {
    let pod_sc = pod.security_context.as_ref();
    let containers: Vec<&Container> = pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
        .collect();
    let non_root = |c: &Container| {
        c.security_context
            .as_ref()
            .and_then(|s| s.run_as_non_root)
            .or(pod_sc.and_then(|s| s.run_as_non_root))
            == Some(true)
    };
    if !containers.iter().all(|c| non_root(c)) {
        refuse("securityContext.runAsNonRoot".into(), "must be true");
    }
    if pod_sc.and_then(|s| s.run_as_user) == Some(0) {
        refuse("securityContext.runAsUser".into(), "must not be 0");
    }
    let seccomp_ok = |t: Option<&str>| matches!(t, Some("RuntimeDefault" | "Localhost"));
    let pod_seccomp = pod_sc
        .and_then(|s| s.seccomp_profile.as_ref())
        .map(|p| p.type_.as_str());
    let each_seccomp = containers.iter().all(|c| {
        seccomp_ok(
            c.security_context
                .as_ref()
                .and_then(|s| s.seccomp_profile.as_ref())
                .map(|p| p.type_.as_str())
                .or(pod_seccomp),
        )
    });
    if !each_seccomp {
        refuse(
            "securityContext.seccompProfile".into(),
            "must be RuntimeDefault or Localhost",
        );
    }
    for (i, v) in pod.volumes.iter().flatten().enumerate() {
        let allowed = v.config_map.is_some()
            || v.csi.is_some()
            || v.downward_api.is_some()
            || v.empty_dir.is_some()
            || v.ephemeral.is_some()
            || v.persistent_volume_claim.is_some()
            || v.projected.is_some()
            || v.secret.is_some();
        if !allowed {
            refuse(
                format!("volumes[{i}]"),
                "a volume type restricted does not allow",
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(v: serde_json::Value) -> PodSpec {
        serde_json::from_value(v).unwrap()
    }

    /// What the probe found a PrefectAgent creator could get: every field is named.
    #[test]
    fn baseline_refuses_what_a_hostile_pod_template_asked_for() {
        let hostile = pod(json!({
            "hostNetwork": true, "hostPID": true, "nodeName": "n1",
            "volumes": [{"name": "root", "hostPath": {"path": "/"}}],
            "containers": [{"name": "prefect-job", "securityContext": {"privileged": true,
                "runAsUser": 0, "capabilities": {"add": ["SYS_ADMIN"]}},
                "ports": [{"containerPort": 80, "hostPort": 80}]}]
        }));
        let found = violations(&hostile, PodSecurity::Baseline);
        for field in [
            "hostNetwork",
            "hostPID",
            "volumes[0].hostPath",
            "containers[0].securityContext.privileged",
            "containers[0].securityContext.capabilities.add",
            "containers[0].ports[0].hostPort",
        ] {
            assert!(
                found.iter().any(|v| v.starts_with(field)),
                "{field} in {found:?}"
            );
        }
        assert!(violations(&hostile, PodSecurity::Privileged).is_empty());
    }

    #[test]
    fn prefect_s_standard_pod_is_baseline_and_the_restricted_profile_is_restricted() {
        let plain = pod(json!({"containers": [{"name": "prefect-job", "image": "x"}]}));
        assert!(violations(&plain, PodSecurity::Baseline).is_empty());
        assert!(!violations(&plain, PodSecurity::Restricted).is_empty());
        let restricted = pod(json!({
            "securityContext": {"runAsNonRoot": true, "runAsUser": 1000,
                "seccompProfile": {"type": "RuntimeDefault"}},
            "volumes": [{"name": "w", "emptyDir": {}}],
            "containers": [{"name": "prefect-job", "securityContext": {
                "allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}}]
        }));
        assert_eq!(
            violations(&restricted, PodSecurity::Restricted),
            Vec::<String>::new()
        );
    }
}
