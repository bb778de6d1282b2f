//! What a KMIP server's answer means: a payload to use, or an error of the right kind.
//!
//! Purging every cached KEK is the most drastic thing the plugin does, so only an authoritative
//! answer is KeyUnusable: a well-formed response to this very request (one batch item, our
//! operation echoed, Result Status Operation Failed) whose Result Reason is Item Not Found,
//! Object Archived or Wrong Key Lifecycle State for an operation naming the key's Unique
//! Identifier, or a well-formed Get Attributes of the key whose State is not Active (the
//! caller's verdict). BadWrappedKey only from the server's Cryptographic Failure answer to a
//! Decrypt (the caller checks the blob's own shape). Authentication Not Successful and
//! Permission Denied are Denied. Everything else is Transient: Pending or Undone, other Result
//! Reasons (General Failure …), and any malformed answer: missing or mistyped fields, an
//! answer for another operation or key, a plaintext of the wrong length, more Unique
//! Identifiers than Maximum Items allowed.

use super::ttlv::{Item, tag};
use super::{STATE_NAMES, op};
use crate::backend::{BackendError, ErrorKind};
use crate::secret::{KEY_LEN, Kek};

fn op_name(operation: u32) -> &'static str {
    match operation {
        op::LOCATE => "Locate",
        op::GET_ATTRIBUTES => "Get Attributes",
        op::ENCRYPT => "Encrypt",
        op::DECRYPT => "Decrypt",
        _ => "an operation",
    }
}

fn malformed(operation: u32, what: impl std::fmt::Display) -> BackendError {
    BackendError::new(
        ErrorKind::Transient,
        format!("kmip {}: {what}: malformed answer", op_name(operation)),
    )
}

/// The payload of a successful answer to `operation`, or the answer's meaning as an error.
pub(super) fn classify(operation: u32, response: &Item) -> Result<Item, BackendError> {
    let mut items = response.children(tag::BATCH_ITEM);
    let (Some(item), None) = (items.next(), items.next()) else {
        return Err(malformed(operation, "not exactly one batch item"));
    };
    // The answer must be to this request (a server out of step would otherwise hand one
    // operation's result to another). Only a refusal of the whole message, which a server
    // may send before it has read our operation, lacks it.
    let echoed = match item.child(tag::OPERATION).map(Item::as_enum) {
        Some(Some(answered)) if answered == operation => true,
        Some(answered) => return Err(malformed(operation, format_args!("answered operation {answered:#x?}"))),
        None => false,
    };
    match item.child(tag::RESULT_STATUS).and_then(Item::as_enum) {
        Some(0) if echoed => {
            return Ok(item
                .child(tag::RESPONSE_PAYLOAD)
                .cloned()
                .unwrap_or_else(|| Item::structure(tag::RESPONSE_PAYLOAD, Vec::new())));
        }
        Some(0) => return Err(malformed(operation, "success without the operation it answers")),
        // Operation Failed; Pending and Undone say nothing about the key.
        Some(1) => {}
        other => return Err(malformed(operation, format_args!("result status {other:?}"))),
    }
    let reason = item.child(tag::RESULT_REASON).and_then(Item::as_enum);
    // The server's own words, shortened and stripped of control characters for the log.
    let message: String = item
        .child(tag::RESULT_MESSAGE)
        .and_then(Item::as_text)
        .unwrap_or("")
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect();
    // Locate names no key: its refusals say nothing about one.
    let names_key = echoed && operation != op::LOCATE;
    let kind = match reason {
        // Authentication Not Successful, Permission Denied.
        Some(0x03 | 0x0C) => ErrorKind::Denied,
        // Item Not Found, Object Archived, Wrong Key Lifecycle State.
        Some(0x01 | 0x0D | 0x0F) if names_key => ErrorKind::KeyUnusable,
        // Cryptographic Failure: the blob does not authenticate.
        Some(0x0A) if names_key && operation == op::DECRYPT => ErrorKind::BadWrappedKey,
        _ => ErrorKind::Transient,
    };
    Err(BackendError::new(
        kind,
        format!("kmip {} refused (reason {reason:#x?}): {message}", op_name(operation)),
    ))
}

/// Checks that a successful answer's payload concerns `uid` (every answer of Get Attributes,
/// Encrypt and Decrypt carries the Unique Identifier of its key).
pub(super) fn check_uid(payload: &Item, uid: &str, operation: u32) -> Result<(), BackendError> {
    match payload.child(tag::UNIQUE_IDENTIFIER).and_then(Item::as_text) {
        Some(u) if u == uid => Ok(()),
        answered => Err(malformed(
            operation,
            format_args!("asked about key {uid:?}, answered about {answered:?}"),
        )),
    }
}

/// State and Initial Date of `uid` from a Get Attributes payload: exactly one of each.
pub(super) fn attributes(payload: &Item, uid: &str) -> Result<(u32, i64), BackendError> {
    check_uid(payload, uid, op::GET_ATTRIBUTES)?;
    let bad = |what: &str| malformed(op::GET_ATTRIBUTES, format_args!("key {uid:?}: {what}"));
    let (mut state, mut initial) = (None, None);
    for attr in payload.children(tag::ATTRIBUTE) {
        let value = attr.child(tag::ATTRIBUTE_VALUE);
        match attr.child(tag::ATTRIBUTE_NAME).and_then(Item::as_text) {
            Some("State") => {
                let v = value
                    .and_then(Item::as_enum)
                    .filter(|s| (1..STATE_NAMES.len() as u32).contains(s))
                    .ok_or_else(|| bad("a State that is no KMIP state"))?;
                if state.replace(v).is_some() {
                    return Err(bad("two States"));
                }
            }
            Some("Initial Date") => {
                let v = value
                    .and_then(Item::as_datetime)
                    .ok_or_else(|| bad("an Initial Date that is no date"))?;
                if initial.replace(v).is_some() {
                    return Err(bad("two Initial Dates"));
                }
            }
            _ => {}
        }
    }
    // The server always sets both (KMIP 1.4 §3.22, §3.23); the key_id depends on the date.
    Ok((
        state.ok_or_else(|| bad("no State"))?,
        initial.ok_or_else(|| bad("no Initial Date"))?,
    ))
}

/// The distinct Unique Identifiers of a Locate payload, at most `max_items` of them (the
/// Maximum Items asked for: more is a malformed answer, never work to do).
pub(super) fn located(payload: &Item, max_items: usize) -> Result<Vec<&str>, BackendError> {
    let found = payload.children(tag::UNIQUE_IDENTIFIER).count();
    if found > max_items {
        return Err(malformed(
            op::LOCATE,
            format_args!("{found} Unique Identifiers for Maximum Items {max_items}"),
        ));
    }
    let mut uids = Vec::with_capacity(found);
    for item in payload.children(tag::UNIQUE_IDENTIFIER) {
        let uid = item
            .as_text()
            .ok_or_else(|| malformed(op::LOCATE, "a Unique Identifier that is not text"))?;
        if !uids.contains(&uid) {
            uids.push(uid);
        }
    }
    Ok(uids)
}

/// The KEK of a Decrypt payload for `uid`. A success that is not a 32-byte KEK for this key
/// proves nothing about the blob (only the server's Cryptographic Failure does, and a
/// BadWrappedKey is remembered as such), so it is Transient.
pub(super) fn kek(payload: &Item, uid: &str) -> Result<Kek, BackendError> {
    check_uid(payload, uid, op::DECRYPT)?;
    let plain = payload
        .child(tag::DATA)
        .and_then(Item::as_bytes)
        .ok_or_else(|| malformed(op::DECRYPT, "no Data"))?;
    Kek::from_bytes(plain).ok_or_else(|| {
        malformed(
            op::DECRYPT,
            format_args!("a plaintext of {} bytes, not a {KEY_LEN}-byte KEK", plain.len()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::super::ttlv::Value;
    use super::*;

    fn answer(batch_item: Vec<Item>) -> Item {
        Item::structure(
            tag::RESPONSE_MESSAGE,
            vec![Item::structure(tag::BATCH_ITEM, batch_item)],
        )
    }

    fn refusal(operation: Option<u32>, status: u32, reason: u32) -> Item {
        let mut item: Vec<Item> = operation
            .map(|o| Item::new(tag::OPERATION, Value::Enumeration(o)))
            .into_iter()
            .collect();
        item.push(Item::new(tag::RESULT_STATUS, Value::Enumeration(status)));
        item.push(Item::new(tag::RESULT_REASON, Value::Enumeration(reason)));
        answer(item)
    }

    fn kind(operation: u32, response: &Item) -> Option<ErrorKind> {
        classify(operation, response).err().map(|e| e.kind)
    }

    fn payload(items: Vec<Item>) -> Item {
        Item::structure(tag::RESPONSE_PAYLOAD, items)
    }

    fn uid(u: &str) -> Item {
        Item::new(tag::UNIQUE_IDENTIFIER, Value::Text(u.into()))
    }

    fn attribute(name: &str, value: Value) -> Item {
        Item::structure(
            tag::ATTRIBUTE,
            vec![
                Item::new(tag::ATTRIBUTE_NAME, Value::Text(name.into())),
                Item::new(tag::ATTRIBUTE_VALUE, value),
            ],
        )
    }

    #[test]
    fn only_a_well_formed_refusal_naming_the_key_revokes() {
        use ErrorKind::*;
        let d = op::DECRYPT;
        assert_eq!(kind(d, &refusal(Some(d), 1, 0x01)), Some(KeyUnusable));
        assert_eq!(
            kind(op::GET_ATTRIBUTES, &refusal(Some(op::GET_ATTRIBUTES), 1, 0x0F)),
            Some(KeyUnusable)
        );
        assert_eq!(kind(d, &refusal(Some(d), 1, 0x0A)), Some(BadWrappedKey));
        assert_eq!(kind(d, &refusal(None, 1, 0x03)), Some(Denied));
        assert_eq!(kind(op::LOCATE, &refusal(Some(op::LOCATE), 1, 0x0C)), Some(Denied));
        // Without our operation echoed, for another operation, from a Locate, not Operation
        // Failed, or for an encryption: ambiguous.
        assert_eq!(kind(d, &refusal(None, 1, 0x01)), Some(Transient));
        assert_eq!(kind(d, &refusal(None, 1, 0x0A)), Some(Transient));
        assert_eq!(kind(d, &refusal(Some(op::ENCRYPT), 1, 0x01)), Some(Transient));
        assert_eq!(kind(op::LOCATE, &refusal(Some(op::LOCATE), 1, 0x01)), Some(Transient));
        assert_eq!(kind(d, &refusal(Some(d), 2, 0x01)), Some(Transient));
        assert_eq!(kind(op::ENCRYPT, &refusal(Some(op::ENCRYPT), 1, 0x0A)), Some(Transient));
        // General Failure, no reason at all, two batch items, none, a success without its
        // operation, an operation that is no enumeration.
        assert_eq!(kind(d, &refusal(Some(d), 1, 0x100)), Some(Transient));
        let no_reason = answer(vec![
            Item::new(tag::OPERATION, Value::Enumeration(d)),
            Item::new(tag::RESULT_STATUS, Value::Enumeration(1)),
        ]);
        assert_eq!(kind(d, &no_reason), Some(Transient));
        let mut two = refusal(Some(d), 1, 0x01);
        if let Value::Structure(items) = &mut two.value {
            items.push(items[0].clone());
        }
        assert_eq!(kind(d, &two), Some(Transient));
        assert_eq!(
            kind(d, &Item::structure(tag::RESPONSE_MESSAGE, vec![])),
            Some(Transient)
        );
        let anonymous = answer(vec![Item::new(tag::RESULT_STATUS, Value::Enumeration(0))]);
        assert_eq!(kind(d, &anonymous), Some(Transient));
        let mistyped = answer(vec![
            Item::new(tag::OPERATION, Value::Integer(d as i32)),
            Item::new(tag::RESULT_STATUS, Value::Enumeration(1)),
            Item::new(tag::RESULT_REASON, Value::Enumeration(0x01)),
        ]);
        assert_eq!(kind(d, &mistyped), Some(Transient));
        let ok = answer(vec![
            Item::new(tag::OPERATION, Value::Enumeration(d)),
            Item::new(tag::RESULT_STATUS, Value::Enumeration(0)),
        ]);
        assert!(classify(d, &ok).is_ok());
    }

    #[test]
    fn an_answer_about_another_key_is_malformed() {
        assert!(check_uid(&payload(vec![uid("7")]), "7", op::DECRYPT).is_ok());
        for p in [payload(vec![uid("8")]), payload(vec![])] {
            assert_eq!(check_uid(&p, "7", op::DECRYPT).unwrap_err().kind, ErrorKind::Transient);
        }
    }

    #[test]
    fn attributes_need_one_state_and_one_date() {
        let state = |s| attribute("State", Value::Enumeration(s));
        let date = attribute("Initial Date", Value::DateTime(5));
        let ok = payload(vec![uid("7"), state(3), date.clone()]);
        assert_eq!(attributes(&ok, "7").unwrap(), (3, 5));
        for bad in [
            payload(vec![uid("7"), state(3)]),
            payload(vec![uid("7"), date.clone()]),
            payload(vec![uid("7"), state(3), state(2), date.clone()]),
            payload(vec![uid("7"), state(99), date.clone()]),
            payload(vec![uid("7"), attribute("State", Value::Integer(2)), date.clone()]),
            payload(vec![uid("8"), state(3), date.clone()]),
        ] {
            assert_eq!(attributes(&bad, "7").unwrap_err().kind, ErrorKind::Transient);
        }
    }

    #[test]
    fn a_locate_is_held_to_its_maximum_items() {
        let p = payload(vec![uid("1"), uid("2"), uid("1")]);
        assert_eq!(located(&p, 3).unwrap(), ["1", "2"]);
        assert_eq!(located(&p, 2).unwrap_err().kind, ErrorKind::Transient);
        assert!(located(&payload(vec![]), 2).unwrap().is_empty());
        let not_text = payload(vec![Item::new(tag::UNIQUE_IDENTIFIER, Value::Integer(1))]);
        assert_eq!(located(&not_text, 2).unwrap_err().kind, ErrorKind::Transient);
    }

    #[test]
    fn a_plaintext_that_is_no_kek_is_transient() {
        let data = |n: usize| Item::new(tag::DATA, Value::Bytes(vec![7; n]));
        assert!(kek(&payload(vec![uid("7"), data(KEY_LEN)]), "7").is_ok());
        for bad in [
            payload(vec![uid("7"), data(KEY_LEN - 1)]),
            payload(vec![uid("7"), data(KEY_LEN + 1)]),
            payload(vec![uid("7")]),
            payload(vec![uid("8"), data(KEY_LEN)]),
        ] {
            assert_eq!(kek(&bad, "7").err().map(|e| e.kind), Some(ErrorKind::Transient));
        }
    }
}
