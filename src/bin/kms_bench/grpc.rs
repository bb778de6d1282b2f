//! status / encrypt / decrypt / mixed: KMS v2 calls against any plugin socket.
//!
//! Only the wire API is assumed: Decrypt requests carry back exactly the ciphertext, key_id and
//! annotations that Encrypt returned, whatever they are, as the apiserver does.

use std::sync::Arc;
use std::time::Duration;

use kms_plugin::client::{self, Client};
use kms_plugin::proto::v2::{DecryptRequest, EncryptRequest, StatusRequest};
use kms_plugin::server::socket::SocketAddress;
use ring::rand::{SecureRandom, SystemRandom};

use crate::load::{self, Stop, Worker};
use crate::report::{Extra, Report};
use crate::{Args, Scenario};

/// A seed encrypted on the target, and the Decrypt request that should give it back.
struct Seed {
    plaintext: Vec<u8>,
    request: DecryptRequest,
}

#[derive(Clone, Copy)]
enum Call {
    Status,
    Encrypt,
    Decrypt,
    /// A Decrypt whose annotations were tampered with (see [`tamper`]); expected to fail.
    Tampered,
}

struct GrpcWorker {
    client: Client,
    /// The calls this worker cycles through (one entry for the pure scenarios).
    plan: Arc<[Call]>,
    step: usize,
    seeds: Arc<Vec<Seed>>,
    plaintext: Vec<u8>,
    id: usize,
    counter: u64,
    /// Random per run, so tampered annotations are new to the target on every run.
    run_nonce: u64,
}

/// The `round`-th tampered form of `request`: every annotation value's first bytes XORed with
/// the round and the run's nonce. Every worker's k-th call makes the same one, so a round's
/// calls all wait on one unwrap: a hostile peer's cheapest way to hold calls open.
fn tamper(request: &DecryptRequest, round: u64, run_nonce: u64) -> DecryptRequest {
    let mut r = request.clone();
    let mask = (round ^ run_nonce).to_le_bytes();
    for value in r.annotations.values_mut() {
        let mut v = value.to_vec();
        for (b, m) in v.iter_mut().zip(mask) {
            *b ^= m;
        }
        *value = v.into();
    }
    r
}

pub fn code_name(status: &tonic::Status) -> String {
    format!("{:?}", status.code())
}

/// A UUID-shaped request uid (36 bytes, like the apiserver's), unique per worker and call.
fn uid(worker: usize, counter: u64) -> String {
    format!(
        "{:08x}-0000-4000-8000-{:012x}",
        worker as u32,
        counter & 0xffff_ffff_ffff
    )
}

impl Worker for GrpcWorker {
    async fn call(&mut self) -> Result<(), String> {
        let call = self.plan[self.step % self.plan.len()];
        self.step += 1;
        self.counter += 1;
        let uid = uid(self.id, self.counter);
        match call {
            Call::Status => {
                let r = self.client.status(StatusRequest {}).await.map_err(|s| code_name(&s))?;
                if r.get_ref().healthz != "ok" {
                    return Err("Unhealthy".into());
                }
                Ok(())
            }
            Call::Encrypt => {
                // Distinct plaintexts: a random per-worker base with the call counter in front.
                let n = self.plaintext.len().min(8);
                self.plaintext[..n].copy_from_slice(&self.counter.to_le_bytes()[..n]);
                let request = EncryptRequest {
                    plaintext: self.plaintext.clone().into(),
                    uid,
                };
                let r = self.client.encrypt(request).await.map_err(|s| code_name(&s))?;
                let r = r.get_ref();
                if r.ciphertext.is_empty() || r.key_id.is_empty() {
                    return Err("EmptyResponse".into());
                }
                Ok(())
            }
            Call::Decrypt => {
                let seed = &self.seeds[(self.id + self.step) % self.seeds.len()];
                let mut request = seed.request.clone();
                request.uid = uid;
                let r = self.client.decrypt(request).await.map_err(|s| code_name(&s))?;
                if r.get_ref().plaintext[..] != seed.plaintext[..] {
                    return Err("Mismatch".into());
                }
                Ok(())
            }
            Call::Tampered => {
                let mut request = tamper(&self.seeds[0].request, self.counter, self.run_nonce);
                request.uid = uid;
                match self.client.decrypt(request).await {
                    Ok(_) => Err("TamperedAccepted".into()),
                    Err(s) => Err(code_name(&s)),
                }
            }
        }
    }
}

/// Opens `n` HTTP/2 connections to `socket`.
pub async fn connect_all(socket: &str, n: usize, timeout: Duration) -> Result<Vec<Client>, String> {
    let address: SocketAddress = socket.parse().map_err(|e| format!("--socket: {e}"))?;
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        clients.push(
            client::connect(&address, timeout)
                .await
                .map_err(|e| format!("connect {socket}: {e}"))?,
        );
    }
    Ok(clients)
}

pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    SystemRandom::new()
        .fill(&mut v)
        .expect("system random number generator");
    v
}

/// Encrypts `n` random seeds on the target and keeps the Decrypt request for each.
async fn make_seeds(client: &mut Client, n: usize, size: usize) -> Result<Vec<Seed>, String> {
    let mut seeds = Vec::with_capacity(n);
    for i in 0..n {
        let plaintext = random_bytes(size);
        let r = client
            .encrypt(EncryptRequest {
                plaintext: plaintext.clone().into(),
                uid: uid(usize::MAX, i as u64),
            })
            .await
            .map_err(|s| {
                format!(
                    "preparing seeds: Encrypt failed with {}: {}",
                    code_name(&s),
                    s.message()
                )
            })?
            .into_inner();
        seeds.push(Seed {
            plaintext,
            request: DecryptRequest {
                ciphertext: r.ciphertext,
                uid: String::new(),
                key_id: r.key_id,
                annotations: r.annotations,
            },
        });
    }
    Ok(seeds)
}

fn parse_mix(mix: &str) -> Result<Vec<Call>, String> {
    let weights: Vec<usize> = mix
        .split(':')
        .map(|w| w.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("--mix {mix:?}: expected three integers S:E:D"))?;
    let [s, e, d] = weights[..] else {
        return Err(format!("--mix {mix:?}: expected three integers S:E:D"));
    };
    if s + e + d == 0 || s + e + d > 10_000 {
        return Err(format!("--mix {mix:?}: weights must add up to 1..=10000"));
    }
    // Smooth weighted round robin: every window of the plan keeps roughly the mix's proportions.
    let total = s + e + d;
    let calls = [(Call::Status, s), (Call::Encrypt, e), (Call::Decrypt, d)];
    let mut credit = [0i64; 3];
    let mut plan = Vec::with_capacity(total);
    for _ in 0..total {
        for (c, (_, w)) in credit.iter_mut().zip(&calls) {
            *c += *w as i64;
        }
        let best = (0..3)
            .max_by_key(|&i| (credit[i], std::cmp::Reverse(i)))
            .expect("three calls");
        credit[best] -= total as i64;
        plan.push(calls[best].0);
    }
    Ok(plan)
}

pub async fn run(args: &Args) -> Result<Report, String> {
    let socket = args.socket.as_deref().ok_or("--socket is required for this scenario")?;
    if args.plaintext_bytes == 0 {
        return Err("--plaintext-bytes must be at least 1".into());
    }
    let mut clients = connect_all(socket, args.connections, args.timeout).await?;
    let status = clients[0]
        .status(StatusRequest {})
        .await
        .map_err(|s| format!("Status failed with {}: {}", code_name(&s), s.message()))?
        .into_inner();
    if status.healthz != "ok" {
        return Err("the plugin reports itself unhealthy".into());
    }
    let plan: Vec<Call> = match args.scenario {
        Scenario::Status => vec![Call::Status],
        Scenario::Encrypt => vec![Call::Encrypt],
        Scenario::Decrypt => vec![Call::Decrypt],
        Scenario::Mixed => parse_mix(&args.mix)?,
        Scenario::Tampered => vec![Call::Tampered],
        other => unreachable!("{} is not a gRPC scenario", other.name()),
    };
    let needs_seeds = plan.iter().any(|c| matches!(c, Call::Decrypt | Call::Tampered));
    let n_seeds = if needs_seeds { args.seeds.max(1) } else { 0 };
    let seeds = Arc::new(make_seeds(&mut clients[0], n_seeds, args.plaintext_bytes).await?);
    let plan: Arc<[Call]> = plan.into();
    let run_nonce = u64::from_le_bytes(random_bytes(8).try_into().expect("8 bytes"));
    let workers: Vec<GrpcWorker> = (0..args.concurrency)
        .map(|id| GrpcWorker {
            client: clients[id % clients.len()].clone(),
            plan: Arc::clone(&plan),
            step: id,
            seeds: Arc::clone(&seeds),
            plaintext: random_bytes(args.plaintext_bytes),
            id,
            counter: 0,
            run_nonce,
        })
        .collect();
    let stop = match args.count {
        Some(n) => Stop::Count(n),
        None => Stop::After(args.duration),
    };
    let measured = load::run(workers, args.warmup, stop).await;
    let mut report = Report::new(args.scenario.name(), args.concurrency, args.connections, measured)
        .extra("threads", Extra::Int(args.threads as u64));
    if needs_seeds {
        report = report.extra("seeds", Extra::Int(n_seeds as u64));
    }
    if args.scenario == Scenario::Mixed {
        report = report.extra("mix", Extra::Text(args.mix.clone()));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_plans_keep_proportions() {
        let plan = parse_mix("1:1:8").unwrap();
        assert_eq!(plan.len(), 10);
        let count = |f: fn(&Call) -> bool| plan.iter().filter(|c| f(c)).count();
        assert_eq!(count(|c| matches!(c, Call::Status)), 1);
        assert_eq!(count(|c| matches!(c, Call::Encrypt)), 1);
        assert_eq!(count(|c| matches!(c, Call::Decrypt)), 8);
        assert!(parse_mix("0:0:0").is_err());
        assert!(parse_mix("1:2").is_err());
        assert!(parse_mix("a:b:c").is_err());
    }

    #[test]
    fn tampered_requests_differ_by_round_and_agree_across_workers() {
        let request = DecryptRequest {
            ciphertext: vec![1; 61].into(),
            uid: String::new(),
            key_id: "k".into(),
            annotations: [("kek.example.dev".to_string(), vec![7u8; 60].into())].into(),
        };
        let value = |r: &DecryptRequest| r.annotations["kek.example.dev"].to_vec();
        assert_ne!(value(&tamper(&request, 1, 9)), value(&request));
        assert_ne!(value(&tamper(&request, 1, 9)), value(&tamper(&request, 2, 9)));
        assert_eq!(value(&tamper(&request, 3, 9)), value(&tamper(&request, 3, 9)));
        assert_eq!(tamper(&request, 3, 9).ciphertext, request.ciphertext);
    }
}
