//! When to replace the current local KEK.

use std::time::Duration;

/// Why a new local KEK was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// No KEK yet (start-up).
    First,
    /// The KEK reached its maximum age.
    Age,
    /// The KEK sealed its maximum number of seeds.
    Uses,
    /// The backend's current root key changed: the KEK must be wrapped by the new one.
    RootKeyChanged,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::First => "first",
            Reason::Age => "age",
            Reason::Uses => "uses",
            Reason::RootKeyChanged => "root_key_changed",
        }
    }
}

/// Limits on one local KEK's life, and how often the backend's current key is checked.
#[derive(Debug, Clone, Copy)]
pub struct RotationPolicy {
    pub max_age: Duration,
    pub max_uses: u64,
    pub check_interval: Duration,
}

impl Default for RotationPolicy {
    fn default() -> Self {
        Self {
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_uses: 1 << 21,
            check_interval: Duration::from_secs(60),
        }
    }
}

impl RotationPolicy {
    /// Whether a KEK of this age and use count must be replaced, and why.
    pub fn due(&self, age: Duration, uses: u64) -> Option<Reason> {
        if age >= self.max_age {
            Some(Reason::Age)
        } else if uses >= self.max_uses {
            Some(Reason::Uses)
        } else {
            None
        }
    }

    /// How long the background task may sleep before it must look again.
    pub fn next_check(&self, age: Duration) -> Duration {
        self.check_interval.min(self.max_age.saturating_sub(age))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_by_age_or_uses() {
        let p = RotationPolicy::default();
        assert_eq!(p.due(Duration::ZERO, 0), None);
        assert_eq!(p.due(p.max_age - Duration::from_secs(1), p.max_uses - 1), None);
        assert_eq!(p.due(p.max_age, 0), Some(Reason::Age));
        assert_eq!(p.due(Duration::ZERO, 1 << 21), Some(Reason::Uses));
        assert_eq!(p.due(p.max_age * 2, 1 << 22), Some(Reason::Age));
    }

    #[test]
    fn next_check_never_oversleeps_the_age_limit() {
        let p = RotationPolicy {
            max_age: Duration::from_secs(100),
            max_uses: 10,
            check_interval: Duration::from_secs(60),
        };
        assert_eq!(p.next_check(Duration::ZERO), Duration::from_secs(60));
        assert_eq!(p.next_check(Duration::from_secs(70)), Duration::from_secs(30));
        assert_eq!(p.next_check(Duration::from_secs(170)), Duration::ZERO);
    }
}
