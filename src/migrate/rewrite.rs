//! The fallback migration: each object read and written back unchanged through the API, as
//! `kubectl replace` does. The apiserver re-seals an object whose stored key_id is stale; the
//! write of an object already current changes nothing in etcd.

use std::time::Duration;

use kube::api::{Api, DynamicObject, ListParams, PostParams, TypeMeta};
use kube::{Client, Error};

use super::Resource;
use super::progress::{Pace, Progress};
use super::proof::Scan;

/// Tries per object when it keeps changing under us (409) or the apiserver sheds load.
const TRIES: u32 = 6;

/// What a resource's rewrite did.
#[derive(Default)]
pub struct Outcome {
    pub rewritten: u64,
    /// Already under the current key in the scan: not written again (a rerun resumes here).
    pub skipped: u64,
    /// Deleted while we went.
    pub gone: u64,
    /// Objects the apiserver would not take back, with why (the first few).
    pub failed: Vec<String>,
    pub failed_count: u64,
}

/// Rewrites every object of `r` that `scan` did not see under the current key.
pub async fn rewrite(
    client: &Client,
    r: &Resource,
    scan: &Scan,
    prefix: &str,
    page: u32,
    pace: &mut Pace,
) -> Result<Outcome, String> {
    let all: Api<DynamicObject> = Api::all_with(client.clone(), &r.api);
    let mut outcome = Outcome::default();
    let mut progress = Progress::new(&r.name(), scan.remaining.get(&r.api.plural).copied().unwrap_or(0));
    let mut token: Option<String> = None;
    let mut restarts = 0;
    loop {
        let mut params = ListParams::default().limit(page);
        if let Some(t) = &token {
            params = params.continue_token(t);
        }
        let list = match all.list(&params).await {
            Ok(list) => list,
            // The continue token expired (etcd compacted past it): start over; what is done is
            // now skipped or a no-op.
            Err(Error::Api(s)) if s.code == 410 && restarts < 3 => {
                restarts += 1;
                token = None;
                continue;
            }
            Err(e) => return Err(format!("listing {}: {e}", r.name())),
        };
        for mut object in list.items {
            let Some(name) = object.metadata.name.clone() else {
                continue;
            };
            let namespace = object.metadata.namespace.clone();
            if etcd_keys(prefix, r, namespace.as_deref(), &name)
                .iter()
                .any(|k| scan.is_current(k))
            {
                outcome.skipped += 1;
                continue;
            }
            object.types = Some(TypeMeta {
                api_version: r.api.api_version.clone(),
                kind: r.api.kind.clone(),
            });
            let api: Api<DynamicObject> = match &namespace {
                Some(ns) => Api::namespaced_with(client.clone(), ns, &r.api),
                None => Api::all_with(client.clone(), &r.api),
            };
            pace.wait().await;
            match replace(&api, &name, object, pace).await {
                Ok(true) => outcome.rewritten += 1,
                Ok(false) => outcome.gone += 1,
                Err(why) => {
                    outcome.failed_count += 1;
                    if outcome.failed.len() < super::proof::LISTED {
                        let at = namespace.map_or_else(|| name.clone(), |ns| format!("{ns}/{name}"));
                        outcome.failed.push(format!("{at}: {why}"));
                    }
                }
            }
            progress.step();
        }
        token = list.metadata.continue_.filter(|t| !t.is_empty());
        if token.is_none() {
            break;
        }
    }
    progress.finish();
    Ok(outcome)
}

/// Where the apiserver stores an object of `r` (`<prefix><resource>/<ns>/<name>`, or with the
/// group first for custom resources). Only used to skip objects already current, so a layout
/// this misses costs a no-op write, never a skipped object.
fn etcd_keys(prefix: &str, r: &Resource, namespace: Option<&str>, name: &str) -> Vec<String> {
    let tail = match namespace {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_string(),
    };
    let mut keys = vec![format!("{prefix}{}/{tail}", r.api.plural)];
    if !r.api.group.is_empty() {
        keys.push(format!("{prefix}{}/{}/{tail}", r.api.group, r.api.plural));
    }
    keys
}

/// PUTs `object` back; on a conflict reads it again and retries. `Ok(false)`: deleted meanwhile.
async fn replace(
    api: &Api<DynamicObject>,
    name: &str,
    mut object: DynamicObject,
    pace: &mut Pace,
) -> Result<bool, String> {
    let mut backoff = Duration::from_millis(200);
    for _ in 0..TRIES {
        match api.replace(name, &PostParams::default(), &object).await {
            Ok(_) => return Ok(true),
            Err(Error::Api(s)) if s.code == 404 => return Ok(false),
            Err(Error::Api(s)) if s.code == 409 => {
                pace.wait().await;
                let types = object.types.take();
                object = match api.get_opt(name).await {
                    Ok(Some(fresh)) => fresh,
                    Ok(None) => return Ok(false),
                    Err(e) => return Err(e.to_string()),
                };
                object.types = types;
            }
            Err(Error::Api(s)) if s.code == 429 || s.code >= 500 => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    Err(format!(
        "not written after {TRIES} tries (conflicts or an overloaded apiserver)"
    ))
}
