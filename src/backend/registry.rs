//! The root keys a backend knows at run time: which key_id is current, and every key_id it may
//! unwrap under with the locator that finds the key on the key manager (an ARN, a label, a
//! Unique Identifier) and whatever else the backend keeps per key.
//!
//! One mutex holds both, so the current key and the known set are always read and changed
//! together (no "current but not known" in between). A panic while holding it cannot leave
//! the maps half-changed (every change is one insert or one assignment), so a poisoned lock is
//! taken over here, once, instead of in every backend.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

/// One known root key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<V> {
    /// What the configuration or the key manager calls the key; not a secret.
    pub locator: String,
    /// The backend's own per-key state.
    pub value: V,
}

impl<V> Entry<V> {
    pub fn new(locator: impl Into<String>, value: V) -> Self {
        Self {
            locator: locator.into(),
            value,
        }
    }
}

struct State<V> {
    current: Option<String>,
    keys: HashMap<String, Entry<V>>,
}

/// key_id → [`Entry`], and the current key_id. Keys are never forgotten: a backend may be asked
/// to unwrap under any key it has known for the process's life.
pub struct KeyRegistry<V> {
    state: Mutex<State<V>>,
}

impl<V: Clone> Default for KeyRegistry<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V: Clone> KeyRegistry<V> {
    /// No key, none current.
    pub fn new() -> Self {
        Self {
            state: Mutex::new(State {
                current: None,
                keys: HashMap::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<V>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The current key_id, once one is known.
    pub fn current(&self) -> Option<String> {
        self.lock().current.clone()
    }

    /// The current key_id with its entry, read together.
    pub fn current_entry(&self) -> Option<(String, Entry<V>)> {
        let state = self.lock();
        let id = state.current.as_ref()?;
        state.keys.get(id).map(|e| (id.clone(), e.clone()))
    }

    /// Whether `key_id` is known (current or not).
    pub fn knows(&self, key_id: &str) -> bool {
        self.lock().keys.contains_key(key_id)
    }

    pub fn get(&self, key_id: &str) -> Option<Entry<V>> {
        self.lock().keys.get(key_id).cloned()
    }

    /// The key_id whose entry has `locator`, if one is known.
    pub fn find(&self, locator: &str) -> Option<String> {
        let state = self.lock();
        state
            .keys
            .iter()
            .find(|(_, e)| e.locator == locator)
            .map(|(id, _)| id.clone())
    }

    /// Adds or replaces `key_id`'s entry; returns the one replaced.
    pub fn insert(&self, key_id: String, entry: Entry<V>) -> Option<Entry<V>> {
        self.lock().keys.insert(key_id, entry)
    }

    /// Adds `key_id` unless it is known already; returns whether it was added.
    pub fn insert_new(&self, key_id: String, entry: Entry<V>) -> bool {
        let mut state = self.lock();
        if state.keys.contains_key(&key_id) {
            return false;
        }
        state.keys.insert(key_id, entry);
        true
    }

    /// Makes `key_id` current, adding `entry` for it unless it is known already (a known key
    /// keeps its entry). Returns the key_id that was current before, with its entry.
    pub fn make_current(&self, key_id: String, entry: Entry<V>) -> Option<(String, Entry<V>)> {
        let mut state = self.lock();
        let previous = state
            .current
            .take()
            .and_then(|id| state.keys.get(&id).cloned().map(|e| (id, e)));
        state.keys.entry(key_id.clone()).or_insert(entry);
        state.current = Some(key_id);
        previous
    }

    /// Every known key but the current one, sorted by key_id.
    pub fn decrypt_only(&self) -> Vec<(String, Entry<V>)> {
        let state = self.lock();
        let mut out: Vec<(String, Entry<V>)> = state
            .keys
            .iter()
            .filter(|(id, _)| state.current.as_ref() != Some(*id))
            .map(|(id, e)| (id.clone(), e.clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Every known key as (key_id, locator), for [`super::Backend::remembered`].
    pub fn remembered(&self) -> Vec<(String, String)> {
        let state = self.lock();
        let mut out: Vec<(String, String)> = state
            .keys
            .iter()
            .map(|(id, e)| (id.clone(), e.locator.clone()))
            .collect();
        out.sort();
        out
    }

    /// Takes over what [`KeyRegistry::remembered`] returned from another registry, for
    /// [`super::Backend::remember`]: keys already known keep their entry, new ones get `value`.
    pub fn remember(&self, keys: Vec<(String, String)>, value: impl Fn() -> V) {
        let mut state = self.lock();
        for (key_id, locator) in keys {
            state.keys.entry(key_id).or_insert_with(|| Entry::new(locator, value()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_is_known_and_previous_is_returned() {
        let r: KeyRegistry<u8> = KeyRegistry::new();
        assert_eq!(r.current(), None);
        assert_eq!(r.current_entry(), None);
        assert!(!r.knows("a"));
        assert_eq!(r.make_current("a".into(), Entry::new("A", 1)), None);
        assert_eq!(r.current(), Some("a".into()));
        assert_eq!(r.current_entry(), Some(("a".into(), Entry::new("A", 1))));
        assert!(r.knows("a"));
        // A new current key: the previous one is returned and stays known.
        assert_eq!(
            r.make_current("b".into(), Entry::new("B", 2)),
            Some(("a".into(), Entry::new("A", 1)))
        );
        assert!(r.knows("a") && r.knows("b"));
        assert_eq!(r.decrypt_only(), vec![("a".into(), Entry::new("A", 1))]);
        // Back to a known key: it keeps its entry, not the one offered.
        r.make_current("a".into(), Entry::new("other", 9));
        assert_eq!(r.get("a"), Some(Entry::new("A", 1)));
        assert_eq!(r.decrypt_only(), vec![("b".into(), Entry::new("B", 2))]);
    }

    #[test]
    fn insert_replaces_and_insert_new_keeps() {
        let r: KeyRegistry<u8> = KeyRegistry::new();
        assert!(r.insert_new("a".into(), Entry::new("A", 1)));
        assert!(!r.insert_new("a".into(), Entry::new("A", 2)));
        assert_eq!(r.get("a").unwrap().value, 1);
        assert_eq!(r.insert("a".into(), Entry::new("A", 3)), Some(Entry::new("A", 1)));
        assert_eq!(r.get("a").unwrap().value, 3);
        assert_eq!(r.find("A"), Some("a".into()));
        assert_eq!(r.find("B"), None);
        assert_eq!(r.get("b"), None);
    }

    #[test]
    fn decrypt_only_lists_every_key_but_the_current_sorted() {
        let r: KeyRegistry<()> = KeyRegistry::new();
        for id in ["c", "a", "b"] {
            r.insert(id.into(), Entry::new(id.to_uppercase(), ()));
        }
        // None current yet: all of them.
        let ids: Vec<String> = r.decrypt_only().into_iter().map(|(id, _)| id).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        r.make_current("b".into(), Entry::new("B", ()));
        let ids: Vec<String> = r.decrypt_only().into_iter().map(|(id, _)| id).collect();
        assert_eq!(ids, ["a", "c"]);
    }

    #[test]
    fn remembered_keys_carry_over_to_a_new_registry() {
        let old: KeyRegistry<Option<&str>> = KeyRegistry::new();
        old.make_current("k1".into(), Entry::new("uid-1", None));
        old.insert("k2".into(), Entry::new("uid-2", Some("destroyed")));
        let remembered = old.remembered();
        assert_eq!(
            remembered,
            [("k1".to_string(), "uid-1".to_string()), ("k2".into(), "uid-2".into())]
        );

        let new: KeyRegistry<Option<&str>> = KeyRegistry::new();
        new.insert("k2".into(), Entry::new("uid-2", None));
        new.remember(remembered, || None);
        assert!(new.knows("k1"));
        assert_eq!(new.get("k1"), Some(Entry::new("uid-1", None)));
        // What the new backend already knew is kept, not overwritten by the old one's view.
        assert_eq!(new.get("k2"), Some(Entry::new("uid-2", None)));
        // Remembering makes nothing current.
        assert_eq!(new.current(), None);
    }

    #[test]
    fn a_panic_while_locked_does_not_lose_the_keys() {
        let r = std::sync::Arc::new(KeyRegistry::<u8>::new());
        r.make_current("a".into(), Entry::new("A", 1));
        let poisoner = std::sync::Arc::clone(&r);
        let panicked = std::thread::spawn(move || {
            let _guard = poisoner.lock();
            panic!("poison the lock");
        })
        .join();
        assert!(panicked.is_err());
        assert!(r.state.is_poisoned());
        assert_eq!(r.current(), Some("a".into()));
        assert!(r.insert_new("b".into(), Entry::new("B", 2)));
        assert!(r.knows("b"));
    }
}
