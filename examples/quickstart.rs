//! Quickstart: connect to a node, make sure the domain root exists with a
//! large collection under it, append one element and read it back.
//!
//! Start a server (`cargo run --bin magma-server`), then run
//! `cargo run --example quickstart [ADDR]` (default 127.0.0.1:51969).

use magma::client::{ClientError, Ref, Session};
use serde::{Deserialize, Serialize};

/// The domain root. `R` is a `NewRef` in the commit that creates the root
/// together with its collection, and a `Ref` once both are stored.
#[derive(Serialize, Deserialize)]
struct Domain<R> {
    name: String,
    items: R,
}

fn main() -> Result<(), ClientError> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:51969".to_string());
    let mut session = Session::connect(&[addr])?;

    if session.root()?.is_none() {
        let created = session.commit(|tx| {
            let items = tx.create_collection();
            let root = tx.create(
                "Domain",
                &Domain {
                    name: "quickstart".to_string(),
                    items,
                },
            );
            tx.set_root(root);
        })?;
        println!("created the domain root in commit {}", created.number);
    }
    // Read your writes: every read from now on must see our last commit.
    session.require_last_seen();
    let root = session.root()?.expect("the domain root exists");
    let domain: Domain<Ref> = root.decode()?;

    let greeting = format!("hello from {}", std::process::id());
    let appended = session.append(domain.items, &greeting)?;
    session.require_last_seen();
    let index = appended.positions[0];
    let back: Vec<String> = session.collection_range_as(domain.items, index, 1)?;
    println!(
        "{}: element {index} of {} is {:?} (commit {}, {} elements)",
        domain.name,
        domain.items,
        back[0],
        appended.number,
        session.collection_len(domain.items)?
    );
    Ok(())
}
