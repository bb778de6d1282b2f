//! Migration by the cluster's own storage version migrator: one `StorageVersionMigration` per
//! resource (`storagemigration.k8s.io`, v1beta1 in 1.35–1.36, v1 from 1.37), created and
//! watched until it succeeds, fails, or the deadline passes.

use std::time::{Duration, Instant};

use kube::api::{Api, DeleteParams, DynamicObject, PostParams};
use kube::discovery::{ApiResource, Discovery};
use kube::{Client, Error};
use serde_json::json;

use super::Resource;

const GROUP: &str = "storagemigration.k8s.io";

/// How a migration ended (or did not).
#[derive(Clone, Debug, PartialEq)]
pub enum State {
    Succeeded,
    Failed(String),
    /// Still running at the deadline.
    Pending,
}

/// The `StorageVersionMigration` resource, if the apiserver serves it.
pub fn served(discovery: &Discovery) -> Option<ApiResource> {
    let group = discovery.get(GROUP)?;
    let version = ["v1", "v1beta1"]
        .into_iter()
        .find(|v| group.versions().any(|g| g == *v))?;
    group
        .versioned_resources(version)
        .into_iter()
        .map(|(ar, _)| ar)
        .find(|ar| ar.kind == "StorageVersionMigration")
}

/// A name per (resource, key): a rerun for the same key finds and reuses it.
fn name(r: &Resource, key_id_hash: &str) -> String {
    let hash = key_id_hash.strip_prefix("sha256:").unwrap_or(key_id_hash);
    let short = &hash[..hash.len().min(12)];
    let what = match r.api.group.as_str() {
        "" => r.api.plural.clone(),
        g => format!("{}.{g}", r.api.plural),
    };
    format!("kms-plugin-{what}-{short}")
}

/// Creates (or finds) one migration per resource and waits up to `deadline` for all of them.
pub async fn migrate(
    client: &Client,
    svm: &ApiResource,
    resources: &[&Resource],
    key_id_hash: &str,
    deadline: Duration,
) -> Result<Vec<State>, String> {
    let api: Api<DynamicObject> = Api::all_with(client.clone(), svm);
    let names: Vec<String> = resources.iter().map(|r| name(r, key_id_hash)).collect();
    for (r, name) in resources.iter().zip(&names) {
        start(&api, svm, r, name).await?;
        println!("  {name}: created for {}", r.name());
    }
    let started = Instant::now();
    let mut states = vec![State::Pending; resources.len()];
    let mut last_line = Instant::now();
    loop {
        for (state, name) in states.iter_mut().zip(&names) {
            if *state == State::Pending {
                let object = api.get(name).await.map_err(|e| format!("reading {name}: {e}"))?;
                *state = state_of(&object);
            }
        }
        let pending = states.iter().filter(|s| **s == State::Pending).count();
        if pending == 0 || started.elapsed() >= deadline {
            return Ok(states);
        }
        if last_line.elapsed() >= Duration::from_secs(15) {
            last_line = Instant::now();
            eprintln!(
                "kms-plugin migrate: {pending} StorageVersionMigration(s) still running after {:.0} s (deadline {:.0} s)",
                started.elapsed().as_secs_f64(),
                deadline.as_secs_f64()
            );
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Creates the migration; an existing one is reused unless it failed (then made again).
async fn start(api: &Api<DynamicObject>, svm: &ApiResource, r: &Resource, name: &str) -> Result<(), String> {
    let object: DynamicObject = serde_json::from_value(json!({
        "apiVersion": svm.api_version,
        "kind": svm.kind,
        "metadata": { "name": name, "labels": { "app.kubernetes.io/managed-by": "kms-plugin-migrate" } },
        "spec": { "resource": { "group": r.api.group, "resource": r.api.plural } },
    }))
    .map_err(|e| e.to_string())?;
    for _ in 0..2 {
        match api.create(&PostParams::default(), &object).await {
            Ok(_) => return Ok(()),
            Err(Error::Api(s)) if s.code == 409 => {
                let existing = api.get(name).await.map_err(|e| format!("reading {name}: {e}"))?;
                if !matches!(state_of(&existing), State::Failed(_)) {
                    return Ok(());
                }
                api.delete(name, &DeleteParams::default())
                    .await
                    .map_err(|e| format!("deleting the failed {name}: {e}"))?;
                // Deletion of a cluster-scoped object without finalizers is immediate.
            }
            Err(e) => return Err(format!("creating StorageVersionMigration {name}: {e}")),
        }
    }
    Err(format!("StorageVersionMigration {name} could not be made again"))
}

/// Reads `status.conditions`: Succeeded or Failed when true, else still pending.
fn state_of(object: &DynamicObject) -> State {
    let conditions = object.data["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let is_true = |kind: &str| {
        conditions
            .iter()
            .find(|c| c["type"] == kind && c["status"] == "True")
            .cloned()
    };
    if is_true("Succeeded").is_some() {
        return State::Succeeded;
    }
    match is_true("Failed") {
        Some(c) => State::Failed(c["message"].as_str().unwrap_or("no message").to_string()),
        None => State::Pending,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(status: serde_json::Value) -> DynamicObject {
        serde_json::from_value(json!({"apiVersion": "storagemigration.k8s.io/v1beta1", "kind": "StorageVersionMigration", "metadata": {"name": "x"}, "status": status})).unwrap()
    }

    #[test]
    fn conditions() {
        assert_eq!(state_of(&object(json!({}))), State::Pending);
        assert_eq!(
            state_of(&object(json!({"conditions": [{"type": "Running", "status": "True"}]}))),
            State::Pending
        );
        assert_eq!(
            state_of(&object(
                json!({"conditions": [{"type": "Succeeded", "status": "True"}]})
            )),
            State::Succeeded
        );
        assert_eq!(
            state_of(&object(
                json!({"conditions": [{"type": "Failed", "status": "True", "message": "m"}]})
            )),
            State::Failed("m".into())
        );
    }
}
