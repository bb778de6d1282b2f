//! `kms-plugin migrate`: the step after every root-key rotation. Checks that every apiserver
//! already writes with the same key, gets every object of the resources this plugin's provider
//! writes re-sealed under it (the cluster's storage version migrator, or a rewrite through the
//! API), then proves it from etcd.
//!
//! `encryption_config` reads what the provider writes, `apiservers` is the preflight,
//! `svm` and `rewrite` are the two ways to migrate, `proof` is the etcd pass before and after.

pub mod apiservers;
pub mod encryption_config;
pub mod progress;
pub mod proof;
pub mod rewrite;
pub mod svm;

use std::path::PathBuf;
use std::time::Duration;

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::discovery::{ApiResource, Discovery, Scope, verbs};
use kube::{Client, Config};

use crate::inventory::etcd::Connection;
use crate::inventory::normalise_prefix;
use encryption_config::{EncryptionConfig, covers};
use svm::State;

/// Exit codes (README "migrate").
pub const EXIT_OK: u8 = 0;
pub const EXIT_ERROR: u8 = 1;
pub const EXIT_REMAINING: u8 = 2;

/// How objects get rewritten.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Method {
    /// StorageVersionMigrations when the apiserver serves them, else rewrite; a migration that
    /// misses the deadline falls back to rewriting its resource.
    Auto,
    /// StorageVersionMigrations only.
    StorageVersionMigration,
    /// Get and update every object through the API.
    Rewrite,
}

/// What the command was asked to do.
pub struct Options {
    pub kubeconfig: Option<PathBuf>,
    pub encryption_config: PathBuf,
    pub provider: Option<String>,
    /// `--apiserver` URLs; none: the endpoints of `default/kubernetes`.
    pub apiservers: Vec<String>,
    pub method: Method,
    /// How long StorageVersionMigrations may take, all together.
    pub deadline: Duration,
    /// Objects written per second at most (rewrite).
    pub rate: u32,
    /// Objects per list call (rewrite).
    pub chunk_size: u32,
    /// Preflight and plan only.
    pub dry_run: bool,
    pub etcd: Connection,
    pub prefix: String,
    pub etcd_page_size: i64,
}

/// One API resource the provider writes.
pub struct Resource {
    pub api: ApiResource,
    pub namespaced: bool,
}

impl Resource {
    /// `secrets`, `deployments.apps`: the form EncryptionConfiguration uses.
    pub fn name(&self) -> String {
        match self.api.group.as_str() {
            "" => self.api.plural.clone(),
            g => format!("{}.{g}", self.api.plural),
        }
    }

    /// The etcd key prefixes its objects may live under.
    fn etcd_prefixes(&self, prefix: &str) -> Vec<String> {
        let mut out = vec![format!("{prefix}{}/", self.api.plural)];
        if !self.api.group.is_empty() {
            out.push(format!("{prefix}{}/{}/", self.api.group, self.api.plural));
        }
        out
    }

    /// Whether the scan's resource segment (`secrets`, or a custom resource's group) is ours.
    fn has_segment(&self, segment: &str) -> bool {
        segment == self.api.plural || (!self.api.group.is_empty() && segment == self.api.group)
    }
}

async fn kube_config(path: Option<&PathBuf>) -> Result<Config, String> {
    match path {
        Some(p) => {
            let file = Kubeconfig::read_from(p).map_err(|e| format!("--kubeconfig {}: {e}", p.display()))?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(|e| format!("--kubeconfig {}: {e}", p.display()))
        }
        None => Config::infer().await.map_err(|e| {
            format!("no Kubernetes credentials (KUBECONFIG, ~/.kube/config or in-cluster): {e}; give --kubeconfig")
        }),
    }
}

/// The listable, updatable resources discovery knows that `patterns` cover.
fn targets(discovery: &Discovery, patterns: &[String]) -> (Vec<Resource>, Vec<String>) {
    let mut found = Vec::new();
    for group in discovery.groups() {
        for (api, caps) in group.recommended_resources() {
            let covered = patterns.iter().any(|p| covers(p, &api.group, &api.plural));
            if covered && caps.supports_operation(verbs::LIST) && caps.supports_operation(verbs::UPDATE) {
                found.push(Resource {
                    namespaced: caps.scope == Scope::Namespaced,
                    api,
                });
            }
        }
    }
    let unmatched = patterns
        .iter()
        .filter(|p| !found.iter().any(|r| covers(p, &r.api.group, &r.api.plural)))
        .cloned()
        .collect();
    (found, unmatched)
}

/// Runs preflight, migration and proof; prints the report; returns the exit code.
pub async fn run(o: Options) -> Result<u8, String> {
    let prefix = normalise_prefix(&o.prefix);
    let shown = o.encryption_config.display().to_string();
    let encryption = EncryptionConfig::read(&o.encryption_config)?;
    let provider = encryption
        .provider(o.provider.as_deref())
        .map_err(|e| format!("--encryption-config {shown}: {e}"))?;
    let patterns = encryption.written_by(&provider);
    if patterns.is_empty() {
        return Err(format!(
            "--encryption-config {shown}: provider {provider:?} is not the first provider of any resource, so it writes nothing to migrate"
        ));
    }
    let config = kube_config(o.kubeconfig.as_ref()).await?;
    let client = Client::try_from(config.clone()).map_err(|e| format!("Kubernetes client: {e}"))?;

    // 1. Preflight: one current key everywhere.
    let urls = apiservers::discover(&client, &o.apiservers).await?;
    let readings = apiservers::read(&config, &urls, &provider).await;
    println!("preflight: the key each apiserver writes with (provider {provider})");
    print!("{}", apiservers::table(&readings));
    let hash = apiservers::agreed(&readings).map_err(|_| {
        "the apiservers do not all report one current key_id, so migrating now could re-seal objects under a key \
         another apiserver cannot read yet, or leave new writes under the old one. Make the new key current on every \
         node (and reload), wait for each apiserver's next Status call (up to a minute), then run migrate again"
            .to_string()
    })?;

    // 2. What the provider writes, as the apiserver serves it.
    let discovery = Discovery::new(client.clone())
        .run()
        .await
        .map_err(|e| format!("API discovery: {e}"))?;
    let (resources, unmatched) = targets(&discovery, &patterns);
    for p in &unmatched {
        println!("note: {p:?} (in the EncryptionConfiguration) matches no resource this apiserver serves");
    }
    let names: Vec<String> = resources.iter().map(Resource::name).collect();
    println!("resources written by {provider}: {}", names.join(", "));
    let covered: Vec<String> = resources.iter().flat_map(|r| r.etcd_prefixes(&prefix)).collect();
    let target = proof::Target {
        connection: &o.etcd,
        prefix: &prefix,
        page_size: o.etcd_page_size,
        provider: &provider,
        key_id_hash: &hash,
        covered: &covered,
    };

    // 3. Plan: what is not under the current key yet.
    let before = proof::scan(&target).await?;
    println!(
        "before: {} key(s) read from etcd at revision {}; {} object(s) under the current key, {} not",
        before.scanned,
        before.revision,
        before.current,
        before.remaining_count()
    );
    if before.scanned == 0 {
        return Err(format!(
            "etcd holds no key under {prefix:?}: wrong --endpoints or --prefix (the apiserver's --etcd-prefix)?"
        ));
    }
    let todo: Vec<&Resource> = resources
        .iter()
        .filter(|r| before.remaining.keys().any(|segment| r.has_segment(segment)))
        .collect();
    let elsewhere: Vec<&String> = before
        .remaining
        .keys()
        .filter(|segment| !resources.iter().any(|r| r.has_segment(segment)))
        .collect();
    if !elsewhere.is_empty() {
        println!(
            "note: {} hold(s) objects under an older key but {provider} no longer writes them: migrate cannot re-seal those; add the resource back to the EncryptionConfiguration, or delete the objects",
            elsewhere.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
        );
    }
    if o.dry_run || todo.is_empty() {
        return Ok(verdict(&before, &hash, o.dry_run));
    }

    // 4. Migrate.
    let svm = match o.method {
        Method::Rewrite => None,
        _ => svm::served(&discovery),
    };
    let mut rewrite: Vec<&Resource> = todo.clone();
    match (o.method, svm) {
        (Method::StorageVersionMigration, None) => {
            return Err(format!(
                "this apiserver does not serve {} (enable it with --runtime-config=storagemigration.k8s.io/v1beta1=true and the StorageVersionMigrator feature gate), or use --method rewrite",
                "storagemigration.k8s.io"
            ));
        }
        (_, Some(api)) => {
            println!(
                "migrating with StorageVersionMigrations ({}), deadline {}",
                api.api_version,
                humantime::format_duration(o.deadline)
            );
            let states = svm::migrate(&client, &api, &todo, &hash, o.deadline).await?;
            rewrite.clear();
            for (r, state) in todo.iter().zip(&states) {
                match state {
                    State::Succeeded => println!("  {}: succeeded", r.name()),
                    State::Failed(why) => println!("  {}: FAILED: {why}", r.name()),
                    State::Pending => println!(
                        "  {}: not finished within the deadline (is kube-controller-manager running with --controllers=*,svm?)",
                        r.name()
                    ),
                }
                if *state != State::Succeeded {
                    rewrite.push(r);
                }
            }
            if !rewrite.is_empty() && o.method == Method::StorageVersionMigration {
                println!("next: run again with --method rewrite to rewrite what the migrator did not finish");
                return Ok(EXIT_ERROR);
            }
        }
        (_, None) => {}
    }
    if !rewrite.is_empty() {
        println!(
            "rewriting through the API (get, then update unchanged), at most {} object(s)/s",
            o.rate
        );
        let mut pace = progress::Pace::new(o.rate);
        for r in &rewrite {
            let out = rewrite::rewrite(&client, r, &before, &prefix, o.chunk_size, &mut pace).await?;
            println!(
                "  {}: {} rewritten, {} already current, {} deleted meanwhile, {} failed",
                r.name(),
                out.rewritten,
                out.skipped,
                out.gone,
                out.failed_count
            );
            for f in &out.failed {
                println!("    {f}");
            }
        }
    }

    // 5. Proof.
    let after = proof::scan(&target).await?;
    println!(
        "after: {} key(s) read at revision {}; {} object(s) under the current key, {} not",
        after.scanned,
        after.revision,
        after.current,
        after.remaining_count()
    );
    Ok(verdict(&after, &hash, false))
}

/// Prints the verdict and the next step; returns the exit code.
fn verdict(scan: &proof::Scan, hash: &str, dry_run: bool) -> u8 {
    if scan.remaining_count() == 0 {
        println!("verdict: every object the scan read is under the current key ({hash})");
        println!(
            "next: the previous root key may be retired once `kms-plugin inventory --require-retirable <its key_id>` exits 0"
        );
        return EXIT_OK;
    }
    print!("{}", scan.render());
    match dry_run {
        true => println!("next: run without --dry-run to rewrite them"),
        false => {
            println!("next: run migrate again (it resumes where it stopped), or rewrite the listed objects by hand")
        }
    }
    EXIT_REMAINING
}
