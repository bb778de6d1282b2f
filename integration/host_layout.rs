//! The host preparation steps in deploy/kms-plugin.yaml's header, run verbatim as root in a
//! temporary root (a mount namespace: /etc is an overlay whose writes land in a temporary
//! directory, /run is a temporary directory), then the plugin serving from that layout as the
//! pod's uid 65532:0 and answering `status`. Then each way the layout can go wrong: the check
//! names the cause (owner or mode) and a fix, and running that fix makes it pass again.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{BIN, outcome};

const MANIFEST: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kms-plugin.yaml");
const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy");

/// The shell lines under "Host preparation" in the manifest's header, `#   ` stripped.
fn documented_steps() -> String {
    let text = std::fs::read_to_string(MANIFEST).unwrap();
    let steps: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("# Host preparation"))
        .skip_while(|l| !l.starts_with("#   "))
        .take_while(|l| l.starts_with("#   "))
        .map(|l| &l["#   ".len()..])
        .collect();
    assert!(steps.len() >= 6, "no host steps found in {MANIFEST}: {steps:?}");
    steps.join("\n")
}

/// A temporary root: the upper layer of /etc and the directory mounted on /run.
struct Root {
    dir: tempfile::TempDir,
}

impl Root {
    fn new() -> Root {
        let dir = tempfile::tempdir().unwrap();
        for sub in ["etc-upper", "etc-work", "run"] {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
        }
        Root { dir }
    }

    fn path(&self, sub: &str) -> PathBuf {
        self.dir.path().join(sub)
    }

    /// Runs `script` with bash as root inside the temporary root, from deploy/ (where the
    /// steps expect config.toml), with kms-plugin on PATH. Returns (success, stdout+stderr).
    fn run(&self, script: &str) -> (bool, String) {
        let bin_dir = Path::new(BIN).parent().unwrap();
        let setup = format!(
            "set -euo pipefail
mount -t overlay overlay -o lowerdir=/etc,upperdir={upper},workdir={work} /etc
chmod 0755 {run}
mount --bind {run} /run
cd {DEPLOY}
export PATH={bin}:$PATH
",
            upper = self.path("etc-upper").display(),
            work = self.path("etc-work").display(),
            run = self.path("run").display(),
            bin = bin_dir.display(),
        );
        let out = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "bash", "-c"])
            .arg(format!("{setup}{script}"))
            .env("KMS_PLUGIN_METRICS__ENABLED", "false")
            .output()
            .unwrap();
        outcome(&out)
    }
}

const CHECK: &str = "kms-plugin check --config /etc/kms-plugin/config.toml --as-user 65532:0";

/// The command after "fix: " in a refusal (up to the end of the line or a " (or" aside).
fn fix_of(text: &str) -> String {
    let at = text.find("fix: ").unwrap_or_else(|| panic!("no fix in: {text}"));
    let rest = &text[at + "fix: ".len()..];
    let end = rest.find(['\n', '(']).unwrap_or(rest.len());
    rest[..end].trim().to_string()
}

#[test]
fn documented_host_steps_pass_and_the_plugin_serves_as_uid_65532() {
    assert!(rustix::process::geteuid().is_root(), "this test needs root (as CI has)");
    let root = Root::new();
    let (ok, text) = root.run(&documented_steps());
    assert!(ok, "the documented steps failed:\n{text}");
    assert!(text.contains("wrap/unwrap round trip succeeded"), "{text}");
    assert!(text.contains("checked for uid 65532"), "{text}");

    // The layout is what the steps say, on the temporary root, not on this machine.
    let meta = |p: &str| std::fs::metadata(p).map(|m| (m.uid(), m.gid(), m.mode() & 0o7777));
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        meta(root.path("run/kmsplugin").to_str().unwrap()).unwrap(),
        (65532, 0, 0o750)
    );
    let key = root.path("etc-upper/kms-plugin/keys/root-1.key");
    assert_eq!(meta(key.to_str().unwrap()).unwrap(), (65532, 0, 0o600));
    assert!(!Path::new("/etc/kms-plugin/keys/root-1.key").exists());

    // The plugin, as the pod runs it (runAsUser 65532, runAsGroup 0, no other groups), serves
    // from that layout; root (the apiserver's user) gets a healthy Status over the socket.
    let (ok, text) = root.run(
        "setpriv --reuid 65532 --regid 0 --clear-groups kms-plugin serve --config /etc/kms-plugin/config.toml &
pid=$!
for _ in $(seq 100); do [ -S /var/run/kmsplugin/kms.sock ] && break; sleep 0.1; done
stat -c 'socket %u:%g %a' /var/run/kmsplugin/kms.sock
kms-plugin status --socket /var/run/kmsplugin/kms.sock; rc=$?
kill $pid; wait $pid || true
exit $rc",
    );
    assert!(ok, "{text}");
    assert!(text.contains("socket 65532:0 660"), "{text}");
    assert!(text.contains("healthz=ok"), "{text}");
}

#[test]
fn every_refusal_names_the_cause_and_a_fix_that_works() {
    assert!(rustix::process::geteuid().is_root(), "this test needs root (as CI has)");
    let root = Root::new();
    let (ok, text) = root.run(&documented_steps());
    assert!(ok, "{text}");

    // Root checking without --as-user: the owner is named as the cause, with the flag.
    let (ok, text) = root.run("kms-plugin check --config /etc/kms-plugin/config.toml");
    assert!(!ok, "{text}");
    assert!(text.contains("owned by uid 65532"), "{text}");
    assert!(text.contains("--as-user 65532"), "{text}");
    assert!(!text.contains("writable by group"), "{text}");

    // (break the layout, what the refusal must say, what else it must not say)
    let cases: &[(&str, &str, &str)] = &[
        (
            "chown root:root /etc/kms-plugin/keys/root-1.key",
            "cannot be read by the plugin's user (uid 65532)",
            "chown 65532 /etc/kms-plugin/keys/root-1.key",
        ),
        (
            "chmod 640 /etc/kms-plugin/keys/root-1.key",
            "must not be readable or writable by group or others",
            "chmod 600 /etc/kms-plugin/keys/root-1.key",
        ),
        (
            "chmod 770 /run/kmsplugin",
            "writable by group or others",
            "chmod 750 /var/run/kmsplugin",
        ),
        (
            "chown 4242 /run/kmsplugin",
            "owned by uid 4242",
            "chown 65532 /var/run/kmsplugin",
        ),
        (
            "chown root /run/kmsplugin",
            "does not let the plugin's user (uid 65532) create its socket",
            "chown 65532 /var/run/kmsplugin",
        ),
        (
            "chown 4242 /etc/kms-plugin/keys",
            "owned by uid 4242",
            "chown 65532 /etc/kms-plugin/keys",
        ),
        (
            "chmod 700 /etc/kms-plugin/keys && chown root /etc/kms-plugin/keys",
            "cannot be entered by the plugin's user (uid 65532, gid 0)",
            "chmod g+x /etc/kms-plugin/keys",
        ),
        (
            "chmod 777 /etc/kms-plugin",
            "writable by group or others",
            "chmod 755 /etc/kms-plugin",
        ),
    ];
    for (breakage, cause, fix) in cases {
        let (ok, text) = root.run(&format!("{breakage}\n{CHECK}"));
        assert!(!ok, "{breakage}: accepted:\n{text}");
        assert!(text.contains(cause), "{breakage}: {text}");
        assert_eq!(fix_of(&text), *fix, "{breakage}: {text}");
        let (ok, text) = root.run(&format!("{fix}\n{CHECK}"));
        assert!(ok, "{breakage}: the fix {fix:?} did not make it pass:\n{text}");
    }
}
