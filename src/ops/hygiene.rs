//! Process hygiene for a process that holds keys: no core dumps, no ptrace by other users,
//! optionally no swapping.

use rustix::process::{DumpableBehavior, Resource, Rlimit, set_dumpable_behavior, setrlimit};

/// Disables core dumps (RLIMIT_CORE = 0) and marks the process non-dumpable
/// (PR_SET_DUMPABLE = 0: no core files, /proc/PID/mem and ptrace only for root).
pub fn harden() -> std::io::Result<()> {
    setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    )?;
    set_dumpable_behavior(DumpableBehavior::NotDumpable)?;
    Ok(())
}

/// Locks all current and future pages in memory so keys never reach swap. Needs
/// CAP_IPC_LOCK or a large enough RLIMIT_MEMLOCK.
pub fn lock_memory() -> std::io::Result<()> {
    rustix::mm::mlockall(rustix::mm::MlockAllFlags::CURRENT | rustix::mm::MlockAllFlags::FUTURE)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn harden_disables_core_dumps() {
        super::harden().unwrap();
        assert_eq!(
            rustix::process::getrlimit(rustix::process::Resource::Core).current,
            Some(0)
        );
        assert_eq!(
            rustix::process::dumpable_behavior().unwrap(),
            rustix::process::DumpableBehavior::NotDumpable
        );
    }
}
