//! Pods in trouble, as a kubelet reports them: stuck on their image, OOM-killed.

use super::*;

/// Creates a run's Job, then its pod with `container_state` as a kubelet would report it;
/// the run must end CRASHED with `expected` in the message, and the Job be deleted.
async fn pod_report_crashes_the_run(
    prefix: &str,
    container_state: serde_json::Value,
    expected: &[&str],
) {
    use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
    let (client, ns, prefect, operator) = setup(prefix).await;
    create_agent(&client, &ns, "watched", &prefect).await;
    let dep = prefect
        .api
        .create_deployment(&prefect.pool, json!({"image": "repo/etl:2"}))
        .await;
    let run = prefect.api.create_run(&dep).await;
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let job_name = format!("prefect-run-{run}");
    let job = job_named(&jobs, &job_name).await;

    // No kubelet here: make the Job's pod and write what a kubelet would report.
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
    sas.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "default"}})).unwrap(),
    )
    .await
    .expect("service account");
    let uid = job.metadata.uid.clone().unwrap();
    let labels = job.spec.unwrap().template.metadata.unwrap().labels.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod_name = format!("{job_name}-abcde");
    // As the Job controller makes it: controlled by the Job (labels alone count for nothing).
    let owner = json!({"apiVersion": "batch/v1", "kind": "Job", "name": job_name,
        "uid": uid, "controller": true, "blockOwnerDeletion": true});
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": pod_name, "labels": labels, "ownerReferences": [owner]},
        "spec": {"automountServiceAccountToken": false, "restartPolicy": "Never",
                 "containers": [{"name": "prefect-job", "image": "repo/etl:2"}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("pod");
    let status = json!({"status": {"phase": "Pending", "containerStatuses": [{
        "name": "prefect-job", "ready": false, "restartCount": 0, "image": "repo/etl:2", "imageID": "",
        "state": container_state}]}});
    pods.patch_status(&pod_name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("pod status");

    let crashed = prefect
        .api
        .wait_state(&run, "CRASHED", Duration::from_secs(60))
        .await;
    let message = crashed["state"]["message"].as_str().unwrap_or_default();
    for needle in expected {
        assert!(message.contains(needle), "{needle:?} in {message:?}");
    }
    wait_for("the Job deleted", Duration::from_secs(30), || async {
        jobs.get_opt(&job_name).await.ok()?.is_none().then_some(())
    })
    .await;
    drop(operator);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_stuck_on_its_image_crashes_the_run_and_its_job_is_deleted() {
    let state = json!({"waiting": {"reason": "ErrImagePull",
        "message": "rpc error: pull access denied for does-not-exist"}});
    pod_report_crashes_the_run("pull", state, &["ErrImagePull", "pull access denied"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oom_killed_pod_crashes_the_run() {
    let state = json!({"terminated": {"reason": "OOMKilled", "exitCode": 137}});
    pod_report_crashes_the_run("oom", state, &["OOMKilled", "exit code 137"]).await;
}
