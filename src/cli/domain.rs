//! The domain root the CLI's clients share, and the race-safe way to add a
//! named large collection under it.
//!
//! Shape (documented in `magma flood --help` and docs/OPERATIONS.md): the
//! domain root is an object whose value is a MessagePack map with the key
//! `"collections"`, itself a map from collection name (string) to a
//! reference (ext type 1) to a large collection. A root the CLI creates has
//! class [`ROOT_CLASS`] and value `{"collections": {}}`; a root created by
//! an application is accepted if its value is a map (the CLI adds the
//! `"collections"` key and keeps every other key and the class).
//!
//! Concurrency. Adding a name is an optimistic rewrite of the root (its
//! version is checked), retried after re-reading on conflict, so two
//! flooders adding different names never lose one. Creating the root
//! itself cannot be checked that way (`set_root` is unconditional), so every
//! client creates it with the same body and the same idempotency token
//! [`CREATE_ROOT_TOKEN`]: the primary applies it once and answers every
//! later attempt with the original outcome; everyone then re-reads the root
//! and adds its name optimistically. This relies on the primary remembering
//! that token (the most recent 100 000 tokens); a client that read "no root"
//! and commits the creation 100 000 commits later could still replace the
//! root, which no real start-up race comes near.
//!
//! This module never deletes or renames an entry and never replaces a root
//! that exists.

use std::thread;
use std::time::{Duration, Instant};

use rmpv::Value;

use crate::cli::error::CliError;
use crate::client::{Ref, Session, Transaction};

/// Class of a domain root created by the CLI.
pub const ROOT_CLASS: &str = "MagmaRoot";
/// Key of the name → collection map in the root's value.
pub const COLLECTIONS_KEY: &str = "collections";
/// Idempotency token of the one commit that creates the domain root.
pub const CREATE_ROOT_TOKEN: &[u8] = b"magma-cli/create-domain-root/v1";
/// How long [`ensure_collection`] keeps retrying after conflicts.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// The value of a freshly created root: `{"collections": {}}`.
pub fn empty_root() -> Value {
    Value::Map(vec![(Value::from(COLLECTIONS_KEY), Value::Map(Vec::new()))])
}

fn collections(root: &Value) -> Result<Option<&[(Value, Value)]>, CliError> {
    let Value::Map(entries) = root else {
        return Err(CliError::IncompatibleRoot(format!(
            "the domain root's value is not a map (it is {}); the CLI keeps its \
             collections under the key \"{COLLECTIONS_KEY}\" of a map",
            kind_of(root)
        )));
    };
    match entries
        .iter()
        .find(|(k, _)| k.as_str() == Some(COLLECTIONS_KEY))
    {
        None => Ok(None),
        Some((_, Value::Map(m))) => Ok(Some(m)),
        Some((_, other)) => Err(CliError::IncompatibleRoot(format!(
            "the domain root's \"{COLLECTIONS_KEY}\" is not a map (it is {})",
            kind_of(other)
        ))),
    }
}

/// The collection named `name` in a root value, if it is there.
pub fn lookup(root: &Value, name: &str) -> Result<Option<Ref>, CliError> {
    let Some(entries) = collections(root)? else {
        return Ok(None);
    };
    match entries.iter().find(|(k, _)| k.as_str() == Some(name)) {
        None => Ok(None),
        Some((_, v)) => Ref::from_value(v).map(Some).ok_or_else(|| {
            CliError::IncompatibleRoot(format!(
                "the domain root's entry \"{name}\" is not a reference (it is {})",
                kind_of(v)
            ))
        }),
    }
}

/// Every collection name in a root value, in stored order.
pub fn names(root: &Value) -> Result<Vec<String>, CliError> {
    Ok(collections(root)?
        .unwrap_or_default()
        .iter()
        .filter_map(|(k, _)| k.as_str().map(str::to_string))
        .collect())
}

/// `root` with `name` mapped to `coll` (a `Ref` or `NewRef` value), every
/// other key kept.
pub fn with_collection(root: &Value, name: &str, coll: Value) -> Result<Value, CliError> {
    let mut colls = collections(root)?.map(<[_]>::to_vec).unwrap_or_default();
    match colls.iter_mut().find(|(k, _)| k.as_str() == Some(name)) {
        Some((_, v)) => *v = coll,
        None => colls.push((Value::from(name), coll)),
    }
    // `collections` accepted only a map.
    let mut entries = root.as_map().cloned().unwrap_or_default();
    let colls = Value::Map(colls);
    match entries
        .iter_mut()
        .find(|(k, _)| k.as_str() == Some(COLLECTIONS_KEY))
    {
        Some((_, v)) => *v = colls,
        None => entries.push((Value::from(COLLECTIONS_KEY), colls)),
    }
    Ok(Value::Map(entries))
}

/// The large collection `name` under the domain root, creating the root
/// and the collection if needed (see the module doc for why this is safe
/// with concurrent clients). Reads use read-your-writes, so a lagging
/// secondary only slows this down.
pub fn ensure_collection(session: &mut Session, name: &str) -> Result<Ref, CliError> {
    let deadline = Instant::now() + SETUP_TIMEOUT;
    let mut pause = Duration::from_millis(10);
    loop {
        session.require_last_seen();
        let retry_error = match session.root()? {
            None => {
                let mut tx = Transaction::new();
                let root = tx.create_value(ROOT_CLASS, empty_root());
                tx.set_root(root).set_token(CREATE_ROOT_TOKEN.to_vec());
                match session.commit_tx(tx) {
                    Ok(outcome) => {
                        // Also a retried token's (older) number: the root exists there.
                        let seen = session.last_seen_commit().max(outcome.number);
                        session.set_required_progress(seen);
                        continue;
                    }
                    // Same token: resending is safe, and re-reading tells.
                    Err(e) if e.is_outcome_unknown() => e,
                    Err(e) => return Err(e.into()),
                }
            }
            Some(root) => {
                if let Some(coll) = lookup(&root.value, name)? {
                    return Ok(coll);
                }
                let mut tx = Transaction::new();
                let coll = tx.create_collection();
                let value = with_collection(&root.value, name, coll.to_value())?;
                tx.put_value(root.oid, root.version, &root.class, value);
                match session.commit_tx(tx) {
                    Ok(outcome) => match outcome.reference(coll) {
                        Some(r) => return Ok(r),
                        None => continue,
                    },
                    // Someone else changed the root (or our rewrite may have
                    // been applied): re-read it and look again.
                    Err(e) if e.is_conflict() || e.is_outcome_unknown() => e,
                    Err(e) => return Err(e.into()),
                }
            }
        };
        if Instant::now() >= deadline {
            return Err(retry_error.into());
        }
        log::debug!("adding collection {name}: {retry_error}; retrying");
        let jitter = Duration::from_micros(rand::random::<u64>() % 10_000);
        thread::sleep(pause + jitter);
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}

/// The collection `name` in the domain root objects of a `read_root` reply
/// (`None`: no root was set).
pub fn find_in_root(root: Option<&Value>, name: &str) -> Result<Ref, CliError> {
    let Some(root) = root else {
        return Err(CliError::NotFound(
            "the repository has no domain root".to_string(),
        ));
    };
    lookup(root, name)?.ok_or_else(|| {
        let known = names(root).unwrap_or_default();
        CliError::NotFound(format!(
            "no collection \"{name}\" in the domain root (it has: {})",
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        ))
    })
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Nil => "nil",
        Value::Boolean(_) => "a boolean",
        Value::Integer(_) => "an integer",
        Value::F32(_) | Value::F64(_) => "a float",
        Value::String(_) => "a string",
        Value::Binary(_) => "binary",
        Value::Array(_) => "an array",
        Value::Map(_) => "a map",
        Value::Ext(..) => "an extension value",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::NewRef;

    #[test]
    fn empty_root_has_no_collections() {
        assert_eq!(lookup(&empty_root(), "a").unwrap(), None);
        assert!(names(&empty_root()).unwrap().is_empty());
    }

    #[test]
    fn adding_keeps_other_names_and_keys() {
        let root = with_collection(&empty_root(), "a", Ref(7).to_value()).unwrap();
        let root = with_collection(&root, "b", Ref(9).to_value()).unwrap();
        assert_eq!(lookup(&root, "a").unwrap(), Some(Ref(7)));
        assert_eq!(lookup(&root, "b").unwrap(), Some(Ref(9)));
        assert_eq!(names(&root).unwrap(), ["a", "b"]);

        let app_root = Value::Map(vec![(Value::from("name"), Value::from("app"))]);
        let root = with_collection(&app_root, "f", NewRef(1).to_value()).unwrap();
        let map = root.as_map().unwrap();
        assert_eq!(map[0], (Value::from("name"), Value::from("app")));
        assert_eq!(map[1].0.as_str(), Some(COLLECTIONS_KEY));
        // A NewRef is not yet a persistent reference.
        assert!(lookup(&root, "f").is_err());
    }

    #[test]
    fn foreign_shapes_are_refused_not_overwritten() {
        assert!(matches!(
            lookup(&Value::from("x"), "a"),
            Err(CliError::IncompatibleRoot(_))
        ));
        let bad = Value::Map(vec![(Value::from(COLLECTIONS_KEY), Value::from(1))]);
        assert!(matches!(
            with_collection(&bad, "a", Ref(1).to_value()),
            Err(CliError::IncompatibleRoot(_))
        ));
        let bad_entry = with_collection(&empty_root(), "a", Value::from(3)).unwrap();
        assert!(matches!(
            lookup(&bad_entry, "a"),
            Err(CliError::IncompatibleRoot(_))
        ));
    }

    #[test]
    fn missing_root_or_name_is_not_found() {
        assert!(matches!(
            find_in_root(None, "a"),
            Err(CliError::NotFound(_))
        ));
        let root = with_collection(&empty_root(), "b", Ref(2).to_value()).unwrap();
        let e = find_in_root(Some(&root), "a").unwrap_err();
        assert!(e.to_string().contains("b"), "{e}");
        assert_eq!(find_in_root(Some(&root), "b").unwrap(), Ref(2));
    }

    #[test]
    fn creation_token_fits_the_protocol_limit() {
        assert!(CREATE_ROOT_TOKEN.len() <= 32);
    }
}
