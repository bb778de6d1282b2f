//! Aggregation of what the scan saw, the retirement verdicts, and the two renderings (a table
//! for people, one JSON document for scripts). Holds counts, hashes and etcd keys, never values.
//! Both renderings show etcd's strings through [`shown`]; counts use the full values.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt::Write as _;

use ring::digest;
use serde::Serialize;

use super::format::{EncryptedObject, Stored};
use super::key_id::Wanted;
use super::shown::{self, shown};
use crate::contract::KEK_ANNOTATION;
use crate::logging::{KeyIdHash, counted};

/// Object keys listed at most per list (with the full count beside them).
pub const LISTED: usize = 20;

/// A count and the first [`LISTED`] etcd keys it counts, as [`shown`].
#[derive(Default, Serialize)]
pub struct KeyList {
    pub count: u64,
    pub keys: Vec<String>,
}

impl KeyList {
    fn add(&mut self, key: &str) {
        self.count += 1;
        if self.keys.len() < LISTED {
            self.keys.push(shown(key).into_owned());
        }
    }
}

/// One resource (the path segment after the prefix).
#[derive(Default, Serialize)]
pub struct Resource {
    pub objects: u64,
    /// provider name → key_id → objects.
    #[serde(serialize_with = "shown::keys2")]
    pub kms_v2: BTreeMap<String, BTreeMap<String, u64>>,
    /// `aescbc`, `aesgcm`, `secretbox`, `kms:v1` → objects.
    pub other_encryption: BTreeMap<&'static str, u64>,
    /// `protobuf`, `json` → objects.
    pub not_encrypted: BTreeMap<&'static str, u64>,
    pub unknown: u64,
}

/// What `--verify` found for one key_id.
#[derive(Default, Serialize)]
pub struct Verify {
    pub open: u64,
    /// Objects that do not open, with why (a gRPC code name or a short phrase) → count.
    pub do_not_open: KeyList,
    #[serde(serialize_with = "shown::keys")]
    pub reasons: BTreeMap<String, u64>,
}

/// One root key_id as KMS v2 envelopes name it.
#[derive(Serialize)]
pub struct KeyId {
    #[serde(serialize_with = "shown::string")]
    pub key_id: String,
    pub key_id_hash: String,
    pub objects: u64,
    #[serde(serialize_with = "shown::list")]
    pub providers: BTreeSet<String>,
    /// Objects whose seed this plugin sealed (they carry its KEK annotation).
    pub sealed_by_this_plugin: u64,
    pub dek_sources: usize,
    pub local_keks: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify: Option<Verify>,
    /// Safe to remove from the configuration: no object is stored under it.
    pub retirable: bool,
    #[serde(skip)]
    sources: HashSet<[u8; 32]>,
    #[serde(skip)]
    keks: HashSet<[u8; 32]>,
}

/// `--require-retirable`'s answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// No object under the key, among objects of the expected provider.
    Retirable,
    /// Objects remain under it (or the configuration still writes with it).
    NotRetirable,
    /// The scan found no KMS v2 object of the expected provider: wrong etcd, prefix or
    /// provider name, so it proves nothing.
    NoEvidence,
}

/// The verdict `--require-retirable` asked for (its strings as [`shown`]).
#[derive(Serialize)]
pub struct Required {
    /// As given on the command line.
    pub requested: String,
    /// The plugin's form, when an object (or the argument itself) names it.
    pub key_id: Option<String>,
    pub key_id_hash: String,
    pub objects: u64,
    /// No object in etcd names this key_id at all.
    pub never_seen: bool,
    /// With `--config`: whether that configuration still names the key, and as what.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub configured: Option<String>,
    pub verdict: Verdict,
    pub retirable: bool,
}

/// The whole report.
#[derive(Serialize)]
pub struct Report {
    /// As [`shown`].
    pub prefix: String,
    pub revision: i64,
    pub keys_scanned: u64,
    pub verified: bool,
    /// Distinct (key_id, encryptedDEKSource, annotations) triples `--verify` opened.
    pub seeds_opened: usize,
    #[serde(serialize_with = "shown::keys")]
    pub resources: BTreeMap<String, Resource>,
    #[serde(serialize_with = "shown::keys")]
    pub key_ids: BTreeMap<String, KeyId>,
    pub unknown: KeyList,
    /// The KMS v2 provider `--require-retirable` judges (`--provider` or the
    /// EncryptionConfiguration), and its objects.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "shown::option")]
    pub provider: Option<String>,
    pub provider_objects: u64,
    /// With a provider: objects stored in the clear, and those of other encryption or other
    /// KMS v2 providers (first [`LISTED`] keys each).
    pub not_encrypted: KeyList,
    pub other_encryption: KeyList,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub require_retirable: Option<Required>,
    /// One line: what to do next.
    pub next: String,
}

fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    for p in parts {
        // Length-prefixed, so ("ab","c") and ("a","bc") differ.
        ctx.update(&(p.len() as u64).to_be_bytes());
        ctx.update(p);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// The identity of a (key_id, encryptedDEKSource, annotations) triple: what `--verify`
/// opens once.
pub fn triple_hash(o: &EncryptedObject) -> [u8; 32] {
    let mut annotations: Vec<_> = o.annotations.iter().collect();
    annotations.sort();
    let mut parts: Vec<&[u8]> = vec![o.key_id.as_bytes(), &o.encrypted_dek_source];
    for (k, v) in annotations {
        parts.push(k.as_bytes());
        parts.push(v);
    }
    sha256(&parts)
}

impl Report {
    pub fn new(prefix: &str, verified: bool, provider: Option<&str>) -> Self {
        Report {
            prefix: shown(prefix).into_owned(),
            revision: 0,
            keys_scanned: 0,
            verified,
            seeds_opened: 0,
            resources: BTreeMap::new(),
            key_ids: BTreeMap::new(),
            unknown: KeyList::default(),
            provider: provider.map(str::to_string),
            provider_objects: 0,
            not_encrypted: KeyList::default(),
            other_encryption: KeyList::default(),
            require_retirable: None,
            next: String::new(),
        }
    }

    /// Counts one object. `opened` is `--verify`'s outcome for it (`None` without `--verify`).
    pub fn add(&mut self, resource: &str, key: &str, stored: &Stored, opened: Option<Result<(), String>>) {
        self.keys_scanned += 1;
        let r = self.resources.entry(resource.to_string()).or_default();
        r.objects += 1;
        let ours = self.provider.as_deref();
        match stored {
            Stored::KmsV2 { provider, .. } if ours == Some(provider.as_str()) => self.provider_objects += 1,
            Stored::Identity(_) if ours.is_some() => self.not_encrypted.add(key),
            Stored::KmsV2 { .. } | Stored::Other(_) if ours.is_some() => self.other_encryption.add(key),
            _ => {}
        }
        match stored {
            Stored::KmsV2 { provider, object } => {
                *r.kms_v2
                    .entry(provider.clone())
                    .or_default()
                    .entry(object.key_id.clone())
                    .or_default() += 1;
                let k = self.key_ids.entry(object.key_id.clone()).or_insert_with(|| KeyId {
                    key_id: object.key_id.clone(),
                    key_id_hash: KeyIdHash(&object.key_id).to_string(),
                    objects: 0,
                    providers: BTreeSet::new(),
                    sealed_by_this_plugin: 0,
                    dek_sources: 0,
                    local_keks: 0,
                    verify: None,
                    retirable: false,
                    sources: HashSet::new(),
                    keks: HashSet::new(),
                });
                k.objects += 1;
                if !k.providers.contains(provider) {
                    k.providers.insert(provider.clone());
                }
                if let Some(kek) = object.annotations.get(KEK_ANNOTATION) {
                    k.sealed_by_this_plugin += 1;
                    k.sources.insert(sha256(&[&object.encrypted_dek_source]));
                    k.keks.insert(sha256(&[kek]));
                }
                if let Some(outcome) = opened {
                    let v = k.verify.get_or_insert_with(Verify::default);
                    match outcome {
                        Ok(()) => v.open += 1,
                        Err(reason) => {
                            v.do_not_open.add(key);
                            *v.reasons.entry(reason).or_default() += 1;
                        }
                    }
                }
            }
            Stored::Other(f) => *r.other_encryption.entry(f.name()).or_default() += 1,
            Stored::Identity(i) => *r.not_encrypted.entry(i.name()).or_default() += 1,
            Stored::Unknown(_) => {
                r.unknown += 1;
                self.unknown.add(key);
            }
        }
    }

    /// Fills in the derived fields; `require` is `--require-retirable`'s argument.
    pub fn finish(&mut self, require: Option<&Wanted>) {
        for k in self.key_ids.values_mut() {
            k.dek_sources = k.sources.len();
            k.local_keks = k.keks.len();
            k.retirable = k.objects == 0;
            if self.verified && k.verify.is_none() {
                k.verify = Some(Verify::default());
            }
        }
        let no_evidence = self.provider_objects == 0;
        self.require_retirable = require.map(|wanted| {
            let hash = wanted.hash();
            let found = self
                .key_ids
                .values()
                .find(|k| wanted.matches(&k.key_id, &k.key_id_hash));
            let objects = found.map_or(0, |k| k.objects);
            let verdict = match (objects, no_evidence) {
                (1.., _) => Verdict::NotRetirable,
                (0, true) => Verdict::NoEvidence,
                (0, false) => Verdict::Retirable,
            };
            Required {
                requested: match wanted {
                    Wanted::KeyId(id) => shown(id).into_owned(),
                    Wanted::Hash(h) => h.clone(),
                },
                key_id: found.map(|k| shown(&k.key_id).into_owned()).or(match wanted {
                    Wanted::KeyId(id) => Some(shown(id).into_owned()),
                    Wanted::Hash(_) => None,
                }),
                key_id_hash: hash,
                objects,
                never_seen: found.is_none(),
                configured: None,
                verdict,
                retirable: verdict == Verdict::Retirable,
            }
        });
        self.next = self.next_step();
    }

    /// With `--config`: records whether the configuration still names the key (`current`:
    /// it writes with it, so it is never retirable).
    /// `names_it` is `None` when only a hash is known (no object names the key_id).
    pub fn configured(&mut self, names_it: Option<bool>, current: bool) {
        if let Some(r) = &mut self.require_retirable {
            r.configured = Some(
                match (names_it, current) {
                    (_, true) => "the CURRENT key of this configuration: new writes use it",
                    (Some(true), false) => "still named by this configuration (decrypt-only)",
                    (Some(false), false) => "not named by this configuration",
                    (None, false) => "cannot tell from a hash alone; give the key_id itself",
                }
                .to_string(),
            );
            if current && r.verdict == Verdict::Retirable {
                r.verdict = Verdict::NotRetirable;
                r.retirable = false;
            }
        }
        self.next = self.next_step();
    }

    fn next_step(&self) -> String {
        let Some(r) = &self.require_retirable else {
            return "next: before removing a root key, run again with --require-retirable <its key_id> and --provider (or --encryption-config)".into();
        };
        match r.verdict {
            Verdict::Retirable => format!(
                "next: remove the key from every node's configuration and reload; keep a copy of it until the next backup of etcd has rotated out ({} object(s) of provider {} were read)",
                self.provider_objects,
                self.provider.as_deref().map(shown).unwrap_or_default()
            ),
            Verdict::NotRetirable if r.objects == 0 => {
                "next: make another key current on every node first (docs/operations.md, rotation), then `kms-plugin migrate`".into()
            }
            Verdict::NotRetirable => {
                "next: run `kms-plugin migrate` to re-seal those objects under the current key, then run this again".into()
            }
            Verdict::NoEvidence => {
                "next: nothing was proven. Check --endpoints (this apiserver's etcd), --prefix (its --etcd-prefix) and --provider / --encryption-config".into()
            }
        }
    }

    /// Whether `--verify` found objects that do not open.
    pub fn verify_failures(&self) -> u64 {
        self.key_ids
            .values()
            .filter_map(|k| k.verify.as_ref())
            .map(|v| v.do_not_open.count)
            .sum()
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// The human table.
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "etcd prefix {}  revision {}  {} objects\n",
            self.prefix, self.revision, self.keys_scanned
        );
        let _ = writeln!(
            out,
            "{:<32} {:>9} {:>9} {:>11} {:>13} {:>9}",
            "RESOURCE", "OBJECTS", "KMS-V2", "OTHER-ENC", "NOT-ENCRYPTED", "UNKNOWN"
        );
        for (name, r) in &self.resources {
            let kms: u64 = r.kms_v2.values().flat_map(|m| m.values()).sum();
            let other: u64 = r.other_encryption.values().sum();
            let plain: u64 = r.not_encrypted.values().sum();
            let _ = writeln!(
                out,
                "{:<32} {:>9} {:>9} {:>11} {:>13} {:>9}",
                shown(name),
                r.objects,
                kms,
                other,
                plain,
                r.unknown
            );
            for (provider, ids) in &r.kms_v2 {
                for (id, n) in ids {
                    let _ = writeln!(out, "    kms v2 {} {}: {n}", shown(provider), shown(id));
                }
            }
            for (f, n) in &r.other_encryption {
                let _ = writeln!(out, "    {f}: {n}");
            }
            for (f, n) in &r.not_encrypted {
                let _ = writeln!(out, "    not encrypted ({f}): {n}");
            }
        }
        if self.key_ids.is_empty() {
            let _ = writeln!(out, "\nno KMS v2 objects");
        }
        for k in self.key_ids.values() {
            let _ = writeln!(out, "\nkey_id {}", shown(&k.key_id));
            let _ = writeln!(out, "  hash          {}", k.key_id_hash);
            let providers: Vec<_> = k.providers.iter().map(|p| shown(p)).collect();
            let _ = writeln!(
                out,
                "  objects       {} (providers: {})",
                k.objects,
                providers.join(", ")
            );
            let _ = writeln!(
                out,
                "  this plugin   {}, {}, {}",
                counted(k.sealed_by_this_plugin, "object"),
                counted(k.dek_sources as u64, "DEK source"),
                counted(k.local_keks as u64, "local KEK")
            );
            if let Some(v) = &k.verify {
                if v.do_not_open.count == 0 {
                    let _ = writeln!(
                        out,
                        "  verify        all {} objects open with this configuration",
                        v.open
                    );
                } else {
                    let reasons: Vec<String> = v.reasons.iter().map(|(r, n)| format!("{}: {n}", shown(r))).collect();
                    let _ = writeln!(
                        out,
                        "  verify        {} of {} objects do NOT open with this configuration ({})",
                        v.do_not_open.count,
                        v.open + v.do_not_open.count,
                        reasons.join(", ")
                    );
                    write_keys(&mut out, &v.do_not_open);
                }
            }
            let _ = writeln!(
                out,
                "  verdict       NOT retirable: {} objects would become unreadable if this key were removed",
                k.objects
            );
        }
        if self.unknown.count > 0 {
            let _ = writeln!(out, "\nunknown/corrupt values: {}", self.unknown.count);
            write_keys(&mut out, &self.unknown);
        }
        if let Some(p) = &self.provider {
            if self.not_encrypted.count > 0 {
                let _ = writeln!(out, "\nnot encrypted: {}", self.not_encrypted.count);
                write_keys(&mut out, &self.not_encrypted);
            }
            if self.other_encryption.count > 0 {
                let _ = writeln!(
                    out,
                    "\nencrypted otherwise than by KMS v2 provider {}: {}",
                    shown(p),
                    self.other_encryption.count
                );
                write_keys(&mut out, &self.other_encryption);
            }
        }
        if let Some(r) = &self.require_retirable {
            let provider = self.provider.as_deref().map(shown).unwrap_or_default();
            let verdict = match r.verdict {
                Verdict::Retirable => "retirable, no object is stored under it".to_string(),
                Verdict::NotRetirable => "NOT retirable".to_string(),
                Verdict::NoEvidence => format!(
                    "NO VERDICT: the scan found no KMS v2 object of provider {provider} ({} keys read under {}; KMS v2 providers seen: {})",
                    self.keys_scanned,
                    self.prefix,
                    self.providers_seen()
                ),
            };
            let _ = writeln!(
                out,
                "\n--require-retirable {}: key_id {} ({}): {} objects: {verdict}",
                r.requested,
                r.key_id.as_deref().unwrap_or("(no object names it)"),
                r.key_id_hash,
                r.objects,
            );
            if r.never_seen {
                let _ = writeln!(out, "  no object in etcd names this key_id: never seen");
            }
            if let Some(c) = &r.configured {
                let _ = writeln!(out, "  configuration: {c}");
            }
            if r.retirable && self.unknown.count > 0 {
                // A corrupt value names no key_id; it is unreadable with or without the key.
                let _ = writeln!(
                    out,
                    "  ({} unknown/corrupt values above name no key_id: unreadable either way)",
                    self.unknown.count
                );
            }
        }
        let _ = writeln!(out, "\n{}", self.next);
        out
    }
}

impl Report {
    /// The KMS v2 providers in the scan with their object counts, or "none".
    fn providers_seen(&self) -> String {
        let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
        for r in self.resources.values() {
            for (p, ids) in &r.kms_v2 {
                *counts.entry(p).or_default() += ids.values().sum::<u64>();
            }
        }
        match counts.is_empty() {
            true => "none".into(),
            false => counts
                .iter()
                .map(|(p, n)| format!("{} ({n})", shown(p)))
                .collect::<Vec<_>>()
                .join(", "),
        }
    }
}

fn write_keys(out: &mut String, list: &KeyList) {
    for key in &list.keys {
        let _ = writeln!(out, "      {key}");
    }
    if list.count > list.keys.len() as u64 {
        let _ = writeln!(out, "      … and {} more", list.count - list.keys.len() as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::format::{Identity, OtherFormat};

    fn obj(key_id: &str, source: u8, kek: Option<u8>) -> Stored {
        Stored::KmsV2 {
            provider: "p".into(),
            object: EncryptedObject {
                encrypted_data: vec![1],
                key_id: key_id.into(),
                encrypted_dek_source: vec![source; 61],
                annotations: kek
                    .map(|k| (KEK_ANNOTATION.to_string(), vec![k; 40]))
                    .into_iter()
                    .collect(),
                encrypted_dek_source_type: 1,
            },
        }
    }

    #[test]
    fn counts_and_verdicts() {
        let mut r = Report::new("/registry/", true, Some("p"));
        r.add("secrets", "/registry/secrets/a/1", &obj("k1", 1, Some(1)), Some(Ok(())));
        r.add("secrets", "/registry/secrets/a/2", &obj("k1", 1, Some(1)), Some(Ok(())));
        r.add("secrets", "/registry/secrets/a/3", &obj("k1", 2, Some(2)), Some(Ok(())));
        r.add(
            "secrets",
            "/registry/secrets/a/4",
            &obj("k2", 3, None),
            Some(Err("NotFound".into())),
        );
        r.add(
            "secrets",
            "/registry/secrets/a/5",
            &Stored::Other(OtherFormat::AesCbc),
            None,
        );
        r.add(
            "widgets",
            "/registry/widgets/x",
            &Stored::Identity(Identity::Json),
            None,
        );
        r.add("widgets", "/registry/widgets/y", &Stored::Unknown("x"), None);
        r.finish(Some(&Wanted::Hash(KeyIdHash("k3").to_string())));
        let k1 = &r.key_ids["k1"];
        assert_eq!(
            (k1.objects, k1.dek_sources, k1.local_keks, k1.sealed_by_this_plugin),
            (3, 2, 2, 3)
        );
        assert_eq!(k1.verify.as_ref().unwrap().open, 3);
        let k2 = &r.key_ids["k2"];
        assert_eq!(k2.verify.as_ref().unwrap().do_not_open.keys, ["/registry/secrets/a/4"]);
        assert_eq!(r.verify_failures(), 1);
        assert_eq!(r.resources["secrets"].other_encryption["aescbc"], 1);
        assert_eq!(r.unknown.keys, ["/registry/widgets/y"]);
        let req = r.require_retirable.as_ref().unwrap();
        assert!(req.retirable && req.key_id.is_none());
        r.finish(Some(&Wanted::Hash(KeyIdHash("k1").to_string())));
        let req = r.require_retirable.as_ref().unwrap();
        assert!(!req.retirable);
        assert_eq!(req.key_id.as_deref(), Some("k1"));
        assert_eq!(req.objects, 3);
        assert!(r.to_table().contains("do NOT open"));
        assert!(r.to_json().contains("\"dek_sources\": 2"));
    }

    #[test]
    fn key_lists_are_bounded() {
        let mut l = KeyList::default();
        for i in 0..100 {
            l.add(&i.to_string());
        }
        assert_eq!((l.count, l.keys.len()), (100, LISTED));
    }
}
