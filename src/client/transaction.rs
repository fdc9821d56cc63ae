//! Building a commit: [`Transaction`] collects puts, new objects, appends,
//! the root and meta attributes into one `CommitBody`; [`CommitOutcome`] is
//! what the primary answered.
//!
//! This module owns the translation from Rust values to a commit body. It
//! must never do I/O: sending, routing and retrying belong to `session`.

use rmpv::Value;
use serde::Serialize;

use crate::client::error::{ClientError, Result};
use crate::client::value::{to_value, NewRef, Object, Ref, COLLECTION_CLASS};
use crate::protocol::{CommitBody, WireAppend, WireNew, WirePut, WireRef};
use crate::types::{CommitNumber, Oid};

/// The changes of one commit. Methods never fail: the first value that
/// cannot be encoded is remembered and reported by the commit, which is
/// then not sent, so building stays short:
///
/// ```no_run
/// # fn demo(s: &mut magma::client::Session, coll: magma::client::Ref) -> Result<(), magma::client::ClientError> {
/// let outcome = s.commit(|tx| {
///     let note = tx.create("Note", &"hello");
///     tx.append(coll, &note);
/// })?;
/// # Ok(()) }
/// ```
///
/// A commit is applied whole or not at all. Every object rewritten with
/// [`Transaction::put`] names the version that was read; if any changed
/// since, the commit fails with `ClientError::Conflict` naming them.
/// Appends never conflict.
#[derive(Debug)]
pub struct Transaction {
    body: CommitBody,
    /// The last temporary id given out. Each transaction starts at a random
    /// base, so a `NewRef` kept from another transaction names no object of
    /// this one and the primary refuses the commit, instead of linking
    /// whatever this transaction created under the same number.
    next_temp: u64,
    error: Option<ClientError>,
}

impl Default for Transaction {
    fn default() -> Transaction {
        Transaction {
            body: CommitBody::default(),
            // Below 2^52: an id any MessagePack library, JavaScript's
            // included, holds exactly.
            next_temp: u64::from(rand::random::<u32>()) << 20,
            error: None,
        }
    }
}

impl Transaction {
    pub fn new() -> Transaction {
        Transaction::default()
    }

    fn encode<T: Serialize + ?Sized>(&mut self, value: &T) -> Value {
        match to_value(value) {
            Ok(v) => v,
            Err(e) => {
                self.error.get_or_insert(e);
                Value::Nil
            }
        }
    }

    /// Rewrite the existing object `oid`, read at `expected_version`.
    pub fn put<T: Serialize + ?Sized>(
        &mut self,
        oid: impl Into<Oid>,
        expected_version: u64,
        class: &str,
        value: &T,
    ) -> &mut Self {
        let value = self.encode(value);
        self.put_value(oid, expected_version, class, value)
    }

    /// [`Transaction::put`] with an already encoded value.
    pub fn put_value(
        &mut self,
        oid: impl Into<Oid>,
        expected_version: u64,
        class: &str,
        value: Value,
    ) -> &mut Self {
        self.body.puts.push(WirePut {
            oid: oid.into(),
            expected_version,
            class: class.to_string(),
            value,
        });
        self
    }

    /// Rewrite an object that was read, keeping its class and expecting the
    /// version it was read at.
    pub fn update<T: Serialize + ?Sized>(&mut self, object: &Object, value: &T) -> &mut Self {
        let (oid, version, class) = (object.oid, object.version, object.class.clone());
        self.put(oid, version, &class, value)
    }

    /// Create an object; the returned temporary reference may be stored in
    /// other values of this commit, used as a collection or as the root.
    pub fn create<T: Serialize + ?Sized>(&mut self, class: &str, value: &T) -> NewRef {
        let value = self.encode(value);
        self.create_value(class, value)
    }

    /// [`Transaction::create`] with an already encoded value.
    pub fn create_value(&mut self, class: &str, value: Value) -> NewRef {
        self.next_temp += 1;
        self.body.news.push(WireNew {
            temp_id: self.next_temp,
            class: class.to_string(),
            value,
        });
        NewRef(self.next_temp)
    }

    /// Create an empty large collection (class `MagmaCollection`).
    pub fn create_collection(&mut self) -> NewRef {
        self.create_value(COLLECTION_CLASS, Value::Nil)
    }

    /// Append to a large collection, existing ([`Ref`]) or created in this
    /// commit ([`NewRef`]). The element's index is in
    /// [`CommitOutcome::positions`], in the order of the appends.
    pub fn append<T: Serialize + ?Sized>(
        &mut self,
        coll: impl Into<WireRef>,
        value: &T,
    ) -> &mut Self {
        let value = self.encode(value);
        self.append_value(coll, value)
    }

    /// [`Transaction::append`] with an already encoded value.
    pub fn append_value(&mut self, coll: impl Into<WireRef>, value: Value) -> &mut Self {
        self.body.appends.push(WireAppend {
            coll: coll.into(),
            value,
        });
        self
    }

    /// Make `root` the user's domain root.
    pub fn set_root(&mut self, root: impl Into<WireRef>) -> &mut Self {
        self.body.set_root = Some(root.into());
        self
    }

    /// Set a meta attribute of the repository; `None` removes it.
    pub fn set_meta<T: Serialize + ?Sized>(&mut self, key: &str, value: Option<&T>) -> &mut Self {
        let value = value.map(|v| self.encode(v));
        self.body.meta.push((key.to_string(), value));
        self
    }

    /// Remove a meta attribute.
    pub fn remove_meta(&mut self, key: &str) -> &mut Self {
        self.body.meta.push((key.to_string(), None));
        self
    }

    /// Use this idempotency token (at most 32 bytes) instead of a fresh
    /// random one, e.g. to resend a commit whose outcome was unknown.
    pub fn set_token(&mut self, token: Vec<u8>) -> &mut Self {
        self.body.token = Some(token);
        self
    }

    /// True when the transaction changes nothing.
    pub fn is_empty(&self) -> bool {
        let b = &self.body;
        b.puts.is_empty()
            && b.news.is_empty()
            && b.appends.is_empty()
            && b.set_root.is_none()
            && b.meta.is_empty()
    }

    /// The commit body, or the first encoding error.
    pub fn into_body(self) -> Result<CommitBody> {
        match self.error {
            Some(e) => Err(e),
            None => Ok(self.body),
        }
    }
}

/// What the primary answered to a commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitOutcome {
    /// The commit's number; read-your-writes reads require it.
    pub number: CommitNumber,
    /// Temporary id -> assigned oid, for every new object.
    pub new_oids: Vec<(u64, Oid)>,
    /// Element index of each append, in the order of the appends.
    pub positions: Vec<u64>,
    /// The primary recognised the token of a commit it had already applied
    /// (a resend after a lost reply) and answered with that commit's number
    /// only: `new_oids` and `positions` are then empty, as the primary does
    /// not remember them. Detected for commits that create objects or
    /// append; for any other commit a replay is indistinguishable from (and
    /// as good as) the original answer.
    pub replayed: bool,
}

impl CommitOutcome {
    /// The real oid given to a new object of this commit.
    pub fn oid(&self, new: NewRef) -> Option<Oid> {
        self.new_oids
            .iter()
            .find(|(temp, _)| *temp == new.0)
            .map(|(_, oid)| *oid)
    }

    /// A persistent reference to a new object of this commit.
    pub fn reference(&self, new: NewRef) -> Option<Ref> {
        self.oid(new).map(Ref)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::value::NEW_REF_EXT;

    #[derive(Serialize)]
    struct Root {
        items: NewRef,
    }

    #[test]
    fn builds_a_body_with_temporary_ids_from_one() {
        let mut tx = Transaction {
            next_temp: 0,
            ..Transaction::new()
        };
        assert!(tx.is_empty());
        let coll = tx.create_collection();
        let root = tx.create("Root", &Root { items: coll });
        tx.set_root(root).append(coll, &"a").append(Ref(9), &1u8);
        tx.set_meta("owner", Some(&"me")).remove_meta("old");
        tx.put(Ref(5), 3, "C", &true);
        assert!(!tx.is_empty());
        let body = tx.into_body().unwrap();
        assert_eq!((coll, root), (NewRef(1), NewRef(2)));
        assert_eq!(body.news[0].class, COLLECTION_CLASS);
        assert_eq!(body.news[0].value, Value::Nil);
        let items = &body.news[1].value.as_map().unwrap()[0].1;
        assert_eq!(*items, Value::Ext(NEW_REF_EXT, 1u64.to_be_bytes().to_vec()));
        assert_eq!(body.set_root, Some(WireRef::New(2)));
        assert_eq!(body.appends[0].coll, WireRef::New(1));
        assert_eq!(body.appends[1].coll, WireRef::Oid(9));
        assert_eq!(
            body.meta,
            vec![
                ("owner".to_string(), Some(Value::from("me"))),
                ("old".to_string(), None)
            ]
        );
        assert_eq!(body.puts[0].oid, 5);
        assert_eq!(body.puts[0].expected_version, 3);
        assert_eq!(body.token, None, "the session adds the token");
    }

    #[test]
    fn first_encoding_error_is_reported() {
        struct Bad;
        impl Serialize for Bad {
            fn serialize<S: serde::Serializer>(
                &self,
                _: S,
            ) -> std::result::Result<S::Ok, S::Error> {
                Err(serde::ser::Error::custom("refuses"))
            }
        }
        let mut tx = Transaction::new();
        tx.append(Ref(1), &Bad);
        assert!(matches!(tx.into_body(), Err(ClientError::Encode(_))));
    }

    #[test]
    fn a_new_ref_kept_from_another_transaction_names_none_of_this_ones() {
        let mut first = Transaction::new();
        let kept = first.create("C", &1u8);
        let mut second = Transaction::new();
        let mine = second.create("C", &2u8);
        second.append(kept, &3u8);
        let body = second.into_body().unwrap();
        assert_ne!(kept, mine);
        assert!(body.news.iter().all(|n| n.temp_id != kept.0));
        // The primary refuses a temporary id no new object has (see
        // storage::object's rewrite), so nothing is linked by mistake.
        assert_eq!(body.appends[0].coll, WireRef::New(kept.0));
        assert!(mine.0 < 1 << 52);
    }

    #[test]
    fn outcome_maps_temporary_ids() {
        let o = CommitOutcome {
            number: 4,
            new_oids: vec![(1, 100), (2, 101)],
            positions: vec![],
            replayed: false,
        };
        assert_eq!(o.reference(NewRef(2)), Some(Ref(101)));
        assert_eq!(o.oid(NewRef(3)), None);
    }
}
