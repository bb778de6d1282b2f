//! A throw-away SoftHSM2 token for the PKCS#11 tests, driven with the standard tools
//! (`softhsm2-util`, OpenSC's `pkcs11-tool`) in child processes with their own SOFTHSM2_CONF.

use std::path::PathBuf;
use std::process::Command;

use super::{Dir, rand_hex};

pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// Long enough for the log scans to search for (they need 16 bytes or more).
pub const PIN: &str = "kms-test-pin-8d3f61a0c2b7e945";

pub struct SoftHsm {
    pub conf: PathBuf,
    pub token: String,
    pub pin_file: PathBuf,
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (run integration/test.sh: it installs softhsm2 and opensc)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl SoftHsm {
    /// A fresh token in `dir`, with a PIN file of mode 0600.
    pub fn new(dir: &Dir) -> SoftHsm {
        assert!(
            std::path::Path::new(MODULE).exists(),
            "{MODULE} missing: run integration/test.sh (installs softhsm2)"
        );
        let tokens = dir.path("softhsm-tokens");
        std::fs::create_dir_all(&tokens).unwrap();
        let conf = dir.path("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .unwrap();
        let token = format!("kms-{}", rand_hex(4));
        let hsm = SoftHsm {
            pin_file: dir.path("pin"),
            conf,
            token,
        };
        run(hsm.cmd("softhsm2-util").args([
            "--init-token",
            "--free",
            "--label",
            &hsm.token,
            "--pin",
            PIN,
            "--so-pin",
            "654321",
        ]));
        std::fs::write(&hsm.pin_file, format!("{PIN}\n")).unwrap();
        std::fs::set_permissions(&hsm.pin_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        hsm
    }

    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("SOFTHSM2_CONF", &self.conf);
        c
    }

    fn tool(&self) -> Command {
        let mut c = self.cmd("pkcs11-tool");
        c.args([
            "--module",
            MODULE,
            "--token-label",
            &self.token,
            "--login",
            "--pin",
            PIN,
        ]);
        c
    }

    /// Generates a non-extractable AES-256 key labelled `label` on the token.
    pub fn keygen(&self, label: &str) {
        run(self
            .tool()
            .args(["--keygen", "--key-type", "AES:32", "--sensitive", "--label", label]));
    }

    /// Deletes the secret key labelled `label`.
    pub fn delete(&self, label: &str) {
        run(self
            .tool()
            .args(["--delete-object", "--type", "secrkey", "--label", label]));
    }

    /// The environment the plugin needs to see this token.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![("SOFTHSM2_CONF", self.conf.display().to_string())]
    }

    /// A plugin config for this token.
    pub fn config(&self, dir: &Dir, current: &str, old: &[&str], pin_file: &std::path::Path, extra: &str) -> PathBuf {
        let old: Vec<String> = old.iter().map(|l| format!("{l:?}")).collect();
        dir.write_config(&format!(
            "{extra}\n[socket]\npath = {:?}\n[backend]\ntype = \"pkcs11\"\nmodule = {MODULE:?}\ntoken_label = {:?}\npin_file = {:?}\ncurrent_key_label = {current:?}\ndecrypt_only_key_labels = [{}]\n",
            dir.socket(),
            self.token,
            pin_file.display().to_string(),
            old.join(", ")
        ))
    }
}

/// Builds `pkcs11_unplug.c` into `dir`: a module in front of SoftHSM2 that answers
/// CKR_DEVICE_REMOVED while the file `flag` exists, SoftHSM2's outage (it runs inside the
/// plugin's process and cannot be stopped). Returns the module and the environment it needs.
pub fn unpluggable(dir: &Dir, flag: &std::path::Path) -> (PathBuf, Vec<(&'static str, String)>) {
    let module = dir.path("pkcs11-unplug.so");
    run(Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&module)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/integration/common/pkcs11_unplug.c"
        ))
        .arg("-ldl"));
    let env = vec![
        ("UNPLUG_MODULE", MODULE.to_string()),
        ("UNPLUG_FLAG", flag.display().to_string()),
    ];
    (module, env)
}
