//! The EncryptionConfiguration kube-apiserver runs with (`--encryption-provider-config`), read
//! for two answers: this plugin's provider name, and the resources it writes.

use std::path::Path;

use serde::Deserialize;

/// Larger than any real configuration; checked before reading.
const MAX_BYTES: u64 = 1 << 20;

#[derive(Deserialize)]
struct File {
    kind: String,
    #[serde(default)]
    resources: Vec<Entry>,
}

#[derive(Deserialize)]
struct Entry {
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default)]
    providers: Vec<Provider>,
}

/// One provider entry; only `kms` matters here, the others (identity, aescbc, …) are skipped.
#[derive(Deserialize)]
struct Provider {
    kms: Option<Kms>,
}

#[derive(Deserialize)]
struct Kms {
    name: String,
    #[serde(rename = "apiVersion", default)]
    api_version: Option<String>,
}

/// A parsed EncryptionConfiguration.
pub struct EncryptionConfig {
    entries: Vec<Entry>,
}

impl EncryptionConfig {
    /// Reads `path` (YAML or JSON, as the apiserver accepts).
    pub fn read(path: &Path) -> Result<Self, String> {
        let shown = path.display();
        let len = std::fs::metadata(path)
            .map_err(|e| format!("--encryption-config {shown}: {e}"))?
            .len();
        if len > MAX_BYTES {
            return Err(format!(
                "--encryption-config {shown}: {len} bytes, more than the {MAX_BYTES} an EncryptionConfiguration can need"
            ));
        }
        let text = std::fs::read_to_string(path).map_err(|e| format!("--encryption-config {shown}: {e}"))?;
        Self::parse(&text).map_err(|e| format!("--encryption-config {shown}: {e}"))
    }

    /// Parses the text of an EncryptionConfiguration.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: File = serde_saphyr::from_str(text).map_err(|e| format!("not an EncryptionConfiguration: {e}"))?;
        if file.kind != "EncryptionConfiguration" {
            return Err(format!("kind is {:?}, not EncryptionConfiguration", file.kind));
        }
        Ok(EncryptionConfig {
            entries: file.resources,
        })
    }

    /// The names of its KMS v2 providers, in order of appearance, without repeats.
    pub fn kms_v2_providers(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for kms in self
            .entries
            .iter()
            .flat_map(|e| &e.providers)
            .filter_map(|p| p.kms.as_ref())
        {
            if kms.api_version.as_deref() == Some("v2") && !names.contains(&kms.name) {
                names.push(kms.name.clone());
            }
        }
        names
    }

    /// `wanted` if it is one of the KMS v2 providers, or the only one when none is named.
    pub fn provider(&self, wanted: Option<&str>) -> Result<String, String> {
        let names = self.kms_v2_providers();
        match (wanted, names.as_slice()) {
            (Some(w), _) if names.iter().any(|n| n == w) => Ok(w.to_string()),
            (Some(w), []) => Err(format!("it names no KMS v2 provider (looked for {w:?})")),
            (Some(w), _) => Err(format!(
                "it has no KMS v2 provider named {w:?}; it has {}",
                names.join(", ")
            )),
            (None, [one]) => Ok(one.clone()),
            (None, []) => Err("it names no KMS v2 provider (kms: with apiVersion: v2)".into()),
            (None, _) => Err(format!(
                "it names several KMS v2 providers ({}); choose one with --provider",
                names.join(", ")
            )),
        }
    }

    /// The resource patterns (`secrets`, `deployments.apps`, `*.apps`, `*.*`) whose writes go to
    /// `provider`: those of every entry whose first provider it is. As the apiserver does, a
    /// resource named in an earlier entry belongs to that entry.
    pub fn written_by(&self, provider: &str) -> Vec<String> {
        let mut claimed: Vec<&str> = Vec::new();
        let mut ours = Vec::new();
        for entry in &self.entries {
            let first_is_ours = entry
                .providers
                .first()
                .and_then(|p| p.kms.as_ref())
                .is_some_and(|k| k.name == provider && k.api_version.as_deref() == Some("v2"));
            for resource in &entry.resources {
                if claimed.contains(&resource.as_str()) {
                    continue;
                }
                claimed.push(resource);
                if first_is_ours {
                    ours.push(resource.clone());
                }
            }
        }
        ours
    }
}

/// Whether `pattern` (an EncryptionConfiguration resource) covers `resource` of `group`.
pub fn covers(pattern: &str, group: &str, resource: &str) -> bool {
    let (p_resource, p_group) = pattern.split_once('.').unwrap_or((pattern, ""));
    match (p_resource, p_group) {
        ("*", "*") => true,
        ("*", g) => g == group,
        (r, g) => r == resource && g == group,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEPLOYED: &str = include_str!("../../deploy/encryption-config.yaml");

    #[test]
    fn reads_the_deployed_file() {
        let c = EncryptionConfig::parse(DEPLOYED).unwrap();
        assert_eq!(c.kms_v2_providers(), ["kms-plugin"]);
        assert_eq!(c.provider(None).unwrap(), "kms-plugin");
        assert_eq!(c.written_by("kms-plugin"), ["secrets"]);
        assert!(c.provider(Some("other")).unwrap_err().contains("kms-plugin"));
    }

    #[test]
    fn the_first_provider_writes_and_earlier_entries_win() {
        let text = r#"{"apiVersion":"apiserver.config.k8s.io/v1","kind":"EncryptionConfiguration","resources":[
            {"resources":["configmaps"],"providers":[{"identity":{}},{"kms":{"apiVersion":"v2","name":"p"}}]},
            {"resources":["secrets","configmaps","*.apps"],"providers":[{"kms":{"apiVersion":"v2","name":"p"}}]},
            {"resources":["events"],"providers":[{"kms":{"name":"p"}}]}]}"#;
        let c = EncryptionConfig::parse(text).unwrap();
        assert_eq!(c.written_by("p"), ["secrets", "*.apps"]);
        assert!(covers("*.apps", "apps", "deployments"));
        assert!(!covers("*.apps", "", "secrets"));
        assert!(covers("secrets", "", "secrets"));
        assert!(covers("*.*", "", "secrets"));
        assert!(!covers("deployments.apps", "", "deployments"));
    }

    #[test]
    fn refuses_other_documents() {
        assert!(EncryptionConfig::parse("kind: Pod\n").is_err());
        assert!(EncryptionConfig::parse("{{{").is_err());
        let none = EncryptionConfig::parse("kind: EncryptionConfiguration\nresources: []\n").unwrap();
        assert!(none.provider(None).is_err());
    }
}
