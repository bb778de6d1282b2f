//! Preflight: every kube-apiserver must already write with one and the same key. Each reports
//! the key_id its plugin's Status last returned, hashed, in
//! `apiserver_envelope_encryption_key_id_hash_status_last_timestamp_seconds`; a migration
//! started while they disagree would re-seal objects under a key some apiserver cannot read
//! yet, or leave new writes under the old one.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::Endpoints;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};
use kube::{Client, Config};

const METRIC: &str = "apiserver_envelope_encryption_key_id_hash_status_last_timestamp_seconds";

/// Older than this, a report is stale: a healthy apiserver calls Status every minute, an
/// unhealthy one every ten seconds.
const FRESH: Duration = Duration::from_secs(180);

/// What one apiserver said.
pub struct Reading {
    pub apiserver: String,
    /// The key_id hash it last saw for the provider, or why there is none.
    pub key_id_hash: Result<String, String>,
}

/// The apiservers to ask: `explicit` URLs, or every address of the `default/kubernetes`
/// Service's EndpointSlices.
pub async fn discover(client: &Client, explicit: &[String]) -> Result<Vec<String>, String> {
    if !explicit.is_empty() {
        return Ok(explicit.to_vec());
    }
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let params = ListParams::default().labels("kubernetes.io/service-name=kubernetes");
    let list = slices.list(&params).await.map_err(|e| {
        format!(
            "listing the endpoints of default/kubernetes (to find every apiserver): {e}; name them with --apiserver"
        )
    })?;
    let mut urls = Vec::new();
    for slice in list {
        let port = slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some("https"))
            .or_else(|| slice.ports.iter().flatten().next())
            .and_then(|p| p.port);
        let Some(port) = port else { continue };
        for endpoint in slice.endpoints.iter().flatten() {
            for address in &endpoint.addresses {
                urls.push(url(address, port));
            }
        }
    }
    if urls.is_empty() {
        // No slice (an apiserver that writes only the core Endpoints object).
        urls = from_endpoints(client).await?;
    }
    urls.sort();
    urls.dedup();
    match urls.is_empty() {
        true => Err(
            "default/kubernetes has no endpoints (apiservers that advertise a loopback address publish none): name the apiservers with --apiserver"
                .into(),
        ),
        false => Ok(urls),
    }
}

/// The addresses of the core `default/kubernetes` Endpoints object.
async fn from_endpoints(client: &Client) -> Result<Vec<String>, String> {
    let api: Api<Endpoints> = Api::namespaced(client.clone(), "default");
    let endpoints = api.get_opt("kubernetes").await.map_err(|e| {
        format!("reading default/kubernetes endpoints (to find every apiserver): {e}; name them with --apiserver")
    })?;
    let mut urls = Vec::new();
    for subset in endpoints.into_iter().flat_map(|e| e.subsets.unwrap_or_default()) {
        let Some(port) = subset.ports.iter().flatten().map(|p| p.port).next() else {
            continue;
        };
        for address in subset.addresses.iter().flatten() {
            urls.push(url(&address.ip, port));
        }
    }
    Ok(urls)
}

fn url(address: &str, port: i32) -> String {
    match address.contains(':') {
        true => format!("https://[{address}]:{port}"),
        false => format!("https://{address}:{port}"),
    }
}

/// Asks each apiserver for its current key_id hash for `provider`, with the credentials of
/// `config`. The TLS name stays the one `config` trusts (a load balancer's name is in every
/// apiserver's certificate, their addresses need not be).
pub async fn read(config: &Config, urls: &[String], provider: &str) -> Vec<Reading> {
    let mut readings = Vec::new();
    for url in urls {
        let key_id_hash = read_one(config, url, provider).await;
        readings.push(Reading {
            apiserver: url.clone(),
            key_id_hash,
        });
    }
    readings
}

async fn read_one(config: &Config, url: &str, provider: &str) -> Result<String, String> {
    let mut config = config.clone();
    if config.tls_server_name.is_none() {
        config.tls_server_name = config
            .cluster_url
            .host()
            .map(|h| h.trim_matches(['[', ']']).to_string());
    }
    config.cluster_url = url.parse().map_err(|e| format!("not a URL: {e}"))?;
    config.read_timeout = Some(Duration::from_secs(10));
    config.connect_timeout = Some(Duration::from_secs(5));
    let client = Client::try_from(config).map_err(|e| format!("client: {e}"))?;
    let request = hyper::Request::get("/metrics")
        .body(Vec::new())
        .map_err(|e| e.to_string())?;
    let text = client
        .request_text(request)
        .await
        .map_err(|e| format!("GET /metrics: {e}"))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    latest(&text, provider, now)
}

/// The key_id hash with the newest timestamp for `provider`, if fresh.
fn latest(metrics: &str, provider: &str, now: f64) -> Result<String, String> {
    let wanted = format!("provider_name=\"{provider}\"");
    let newest = metrics
        .lines()
        .filter(|l| l.starts_with(METRIC) && l.contains(&wanted))
        .filter_map(|l| {
            let hash = l.split("key_id_hash=\"").nth(1)?.split('"').next()?;
            let seconds: f64 = l.rsplit_once(' ')?.1.parse().ok()?;
            Some((seconds, hash.to_string()))
        })
        .max_by(|a, b| a.0.total_cmp(&b.0));
    match newest {
        None => Err(format!(
            "no {METRIC} for provider {provider:?}: its plugin never answered Status, or the provider name differs"
        )),
        Some((seconds, _)) if now - seconds > FRESH.as_secs_f64() => {
            Err(format!("its plugin last answered Status {:.0} s ago", now - seconds))
        }
        Some((_, hash)) => Ok(hash),
    }
}

/// The one hash every apiserver reports, or a table of who says what.
pub fn agreed(readings: &[Reading]) -> Result<String, String> {
    let first = readings.first().and_then(|r| r.key_id_hash.as_ref().ok());
    let all_same = readings.iter().all(|r| r.key_id_hash.as_ref().ok() == first);
    match (first, all_same) {
        (Some(hash), true) => Ok(hash.clone()),
        _ => Err(table(readings)),
    }
}

/// One line per apiserver.
pub fn table(readings: &[Reading]) -> String {
    let mut out = String::new();
    for r in readings {
        let _ = match &r.key_id_hash {
            Ok(hash) => writeln!(out, "  {:<32} {hash}", r.apiserver),
            Err(why) => writeln!(out, "  {:<32} unknown: {why}", r.apiserver),
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAPE: &str = "# HELP x\n\
        apiserver_envelope_encryption_key_id_hash_status_last_timestamp_seconds{apiserver_id_hash=\"sha256:a\",key_id_hash=\"sha256:old\",provider_name=\"kms-plugin\"} 1000\n\
        apiserver_envelope_encryption_key_id_hash_status_last_timestamp_seconds{apiserver_id_hash=\"sha256:a\",key_id_hash=\"sha256:new\",provider_name=\"kms-plugin\"} 1.06e+03\n\
        apiserver_envelope_encryption_key_id_hash_status_last_timestamp_seconds{apiserver_id_hash=\"sha256:a\",key_id_hash=\"sha256:zzz\",provider_name=\"other\"} 2000\n";

    #[test]
    fn the_newest_report_of_the_provider_wins() {
        assert_eq!(latest(SCRAPE, "kms-plugin", 1100.0).unwrap(), "sha256:new");
        assert!(
            latest(SCRAPE, "kms-plugin", 1060.0 + 181.0)
                .unwrap_err()
                .contains("181 s ago")
        );
        assert!(latest(SCRAPE, "nope", 1100.0).is_err());
    }

    #[test]
    fn disagreement_names_each_apiserver() {
        let r = |a: &str, h: Result<&str, &str>| Reading {
            apiserver: a.into(),
            key_id_hash: h.map(str::to_string).map_err(str::to_string),
        };
        assert_eq!(
            agreed(&[r("a", Ok("sha256:1")), r("b", Ok("sha256:1"))]).unwrap(),
            "sha256:1"
        );
        let e = agreed(&[r("a", Ok("sha256:1")), r("b", Ok("sha256:2"))]).unwrap_err();
        assert!(
            e.contains("a ") && e.contains("sha256:1") && e.contains("sha256:2"),
            "{e}"
        );
        assert!(agreed(&[r("a", Err("down"))]).unwrap_err().contains("unknown: down"));
        assert!(agreed(&[]).is_err());
    }
}
