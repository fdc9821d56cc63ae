//! Routing decisions of an application session, as pure functions of the
//! node: which members may serve reads, in which order to fail over, and
//! which of two views of the node is newer.
//!
//! This module owns those decisions only. It must never do I/O, so every
//! rule here is unit-tested without a server.

use rand::seq::SliceRandom;
use rand::Rng;

use crate::protocol::ServerRole;
use crate::types::{CommitNumber, Epoch, Member, MemberRole, Node};

/// How fresh a view of the node is: a higher epoch wins; within one epoch
/// membership changes are commits, so the server further ahead wins.
pub(crate) type ViewRank = (Epoch, CommitNumber);

/// True when a server that says it has `role` may serve application reads.
pub(crate) fn serves_reads(role: ServerRole) -> bool {
    matches!(role, ServerRole::Primary | ServerRole::Secondary)
}

/// Servers to read from, best first: the secondaries in random order, then
/// the primary. Members whose address is in `exclude` are left out.
pub(crate) fn read_order<R: Rng>(node: &Node, exclude: &[String], rng: &mut R) -> Vec<Member> {
    let mut order: Vec<Member> = node
        .secondaries()
        .filter(|m| !exclude.contains(&m.addr))
        .cloned()
        .collect();
    order.shuffle(rng);
    order.extend(
        node.primary()
            .filter(|m| !exclude.contains(&m.addr))
            .cloned(),
    );
    order
}

/// Every address worth asking for the node: members first (witnesses
/// included, they know the node), then the addresses the session started
/// from; without duplicates.
pub(crate) fn known_addrs(node: &Node, seeds: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for a in node.members.iter().map(|m| &m.addr).chain(seeds) {
        if !out.contains(a) {
            out.push(a.clone());
        }
    }
    out
}

/// The member for `addr` in `node`, or a stand-in for an address the node
/// does not list yet (e.g. a primary named by a `wrong_server` redirect).
pub(crate) fn member_at(node: &Node, addr: &str, role: MemberRole) -> Member {
    node.members
        .iter()
        .find(|m| m.addr == addr)
        .cloned()
        .unwrap_or(Member {
            server_id: 0,
            addr: addr.to_string(),
            role,
        })
}

/// True when `m` is still a member that may serve reads.
pub(crate) fn still_readable(node: &Node, m: &Member) -> bool {
    node.members
        .iter()
        .any(|n| n.addr == m.addr && matches!(n.role, MemberRole::Primary | MemberRole::Secondary))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn member(id: u64, role: MemberRole) -> Member {
        Member {
            server_id: id,
            addr: format!("h:{id}"),
            role,
        }
    }

    fn node() -> Node {
        Node {
            members: vec![
                member(1, MemberRole::Primary),
                member(2, MemberRole::Secondary),
                member(3, MemberRole::Witness),
                member(4, MemberRole::Secondary),
            ],
        }
    }

    #[test]
    fn reads_prefer_secondaries_then_the_primary_never_a_witness() {
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..20 {
            let order = read_order(&node(), &[], &mut rng);
            let ids: Vec<u64> = order.iter().map(|m| m.server_id).collect();
            assert_eq!(ids.len(), 3);
            assert_eq!(ids[2], 1, "primary last");
            assert!(ids[..2].contains(&2) && ids[..2].contains(&4));
        }
    }

    #[test]
    fn random_choice_spreads_over_secondaries() {
        let mut rng = StdRng::seed_from_u64(7);
        let firsts: Vec<u64> = (0..50)
            .map(|_| read_order(&node(), &[], &mut rng)[0].server_id)
            .collect();
        assert!(firsts.contains(&2) && firsts.contains(&4));
    }

    #[test]
    fn excluded_members_are_skipped_and_a_lone_primary_serves_reads() {
        let mut rng = StdRng::seed_from_u64(1);
        let order = read_order(&node(), &["h:2".into(), "h:4".into()], &mut rng);
        assert_eq!(order, vec![member(1, MemberRole::Primary)]);
        let lone = Node {
            members: vec![member(1, MemberRole::Primary)],
        };
        assert_eq!(read_order(&lone, &[], &mut rng).len(), 1);
        assert!(read_order(&lone, &["h:1".into()], &mut rng).is_empty());
    }

    #[test]
    fn views_rank_by_epoch_then_commit() {
        let old: ViewRank = (Epoch { term: 1, server: 9 }, 500);
        let new: ViewRank = (Epoch { term: 2, server: 1 }, 3);
        assert!(new > old);
        assert!((old.0, 501) > old);
    }

    #[test]
    fn known_addresses_are_members_then_seeds_without_duplicates() {
        let seeds = vec!["h:2".to_string(), "seed:9".to_string()];
        assert_eq!(
            known_addrs(&node(), &seeds),
            vec!["h:1", "h:2", "h:3", "h:4", "seed:9"]
        );
    }

    #[test]
    fn redirect_to_an_unknown_address_gets_a_stand_in() {
        assert_eq!(member_at(&node(), "h:4", MemberRole::Primary).server_id, 4);
        let m = member_at(&node(), "new:1", MemberRole::Primary);
        assert_eq!((m.server_id, m.role), (0, MemberRole::Primary));
        assert!(still_readable(&node(), &member(2, MemberRole::Secondary)));
        assert!(!still_readable(&node(), &member(3, MemberRole::Witness)));
    }
}
