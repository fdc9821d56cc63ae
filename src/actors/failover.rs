//! `FailoverPolicy`: the node's role decisions as pure functions.
//!
//! Events go in, actions come out; the `NodeSupervisor` carries the actions
//! out (contact peers, commit node changes). Nothing here does I/O or keeps
//! state, so every rule is tested on its own.
//!
//! The rules are the seed's, made safer:
//! * a secondary that receives a commit pings the primary: reachable → the
//!   client is sent there; unreachable → the node's **successor** (its first
//!   secondary in order) becomes primary under a new epoch. Every secondary
//!   computes the same successor from the same node, so two secondaries
//!   detecting the failure at once still make one primary;
//! * a server that learns of a newer epoch than its own is no longer
//!   primary;
//! * a former primary that restarts serves as primary only if no member it
//!   can reach knows a newer epoch; otherwise it rejoins the primary that
//!   member names.

use crate::types::{Epoch, Member, MemberRole, Node, NodeAddr};

/// What to do with a commit that reached a secondary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommitOnSecondary {
    /// The primary answers: send the client there.
    Redirect { primary: Option<NodeAddr> },
    /// The primary is gone and this server is the successor: promote.
    PromoteSelf,
    /// The primary is gone; the successor is another server: ask it to
    /// promote and send the client there.
    AskSuccessor { successor: Member },
}

/// The first secondary of the node, in order: who takes over when the
/// primary fails.
pub fn successor(node: &Node) -> Option<&Member> {
    node.members
        .iter()
        .find(|m| m.role == MemberRole::Secondary)
}

pub fn on_commit_at_secondary(node: &Node, me: u64, primary_reachable: bool) -> CommitOnSecondary {
    if primary_reachable {
        return CommitOnSecondary::Redirect {
            primary: node.primary().map(|p| p.addr.clone()),
        };
    }
    match successor(node) {
        Some(s) if s.server_id == me => CommitOnSecondary::PromoteSelf,
        Some(s) => CommitOnSecondary::AskSuccessor {
            successor: s.clone(),
        },
        None => CommitOnSecondary::Redirect { primary: None },
    }
}

/// The node after `me` is promoted: `me` first as primary, the failed
/// primary dropped, every other member kept in order.
pub fn promoted_node(node: &Node, me: &Member, failed_primary: Option<u64>) -> Node {
    let mut members = vec![Member {
        role: MemberRole::Primary,
        ..me.clone()
    }];
    for m in &node.members {
        if m.server_id == me.server_id || Some(m.server_id) == failed_primary {
            continue;
        }
        let role = match m.role {
            MemberRole::Primary => MemberRole::Secondary,
            r => r,
        };
        members.push(Member { role, ..m.clone() });
    }
    Node { members }
}

/// The node after a deliberate swap: `new` primary first, the old primary
/// right after it as the first secondary (the successor), the rest in order.
pub fn swapped_node(node: &Node, new_primary: u64) -> Node {
    let mut out = Vec::with_capacity(node.members.len());
    if let Some(n) = node.member(new_primary) {
        out.push(Member {
            role: MemberRole::Primary,
            ..n.clone()
        });
    }
    if let Some(p) = node.primary() {
        if p.server_id != new_primary {
            out.push(Member {
                role: MemberRole::Secondary,
                ..p.clone()
            });
        }
    }
    for m in &node.members {
        if m.server_id == new_primary || m.role == MemberRole::Primary {
            continue;
        }
        out.push(m.clone());
    }
    Node { members: out }
}

/// What a peer said about itself when a former primary restarted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerView {
    pub addr: NodeAddr,
    pub epoch: Epoch,
    pub is_primary: bool,
    /// The primary that peer's node names.
    pub names_primary: Option<NodeAddr>,
}

/// What a restarted former primary does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Startup {
    /// Nobody reachable knows better: serve as primary.
    ServeAsPrimary,
    /// A newer epoch exists: rejoin the primary at this address.
    Rejoin { primary: NodeAddr, epoch: Epoch },
    /// A newer epoch exists but no reachable member is (or names) a
    /// primary yet: do not serve commits; ask again later.
    Wait { epoch: Epoch },
}

pub fn on_restart_as_primary(my_epoch: Epoch, peers: &[PeerView]) -> Startup {
    let newest = peers
        .iter()
        .filter(|p| p.epoch > my_epoch)
        .max_by_key(|p| p.epoch);
    let Some(newest) = newest else {
        return Startup::ServeAsPrimary;
    };
    // Prefer a peer that is itself the primary of the newest epoch.
    if let Some(p) = peers
        .iter()
        .filter(|p| p.is_primary && p.epoch == newest.epoch)
        .max_by_key(|p| p.epoch)
    {
        return Startup::Rejoin {
            primary: p.addr.clone(),
            epoch: p.epoch,
        };
    }
    match &newest.names_primary {
        Some(addr) => Startup::Rejoin {
            primary: addr.clone(),
            epoch: newest.epoch,
        },
        None => Startup::Wait {
            epoch: newest.epoch,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(id: u64, role: MemberRole) -> Member {
        Member {
            server_id: id,
            addr: format!("h:{id}"),
            role,
        }
    }

    fn node() -> Node {
        Node {
            members: vec![
                m(1, MemberRole::Primary),
                m(2, MemberRole::Secondary),
                m(3, MemberRole::Secondary),
            ],
        }
    }

    #[test]
    fn a_reachable_primary_gets_the_client() {
        assert_eq!(
            on_commit_at_secondary(&node(), 3, true),
            CommitOnSecondary::Redirect {
                primary: Some("h:1".into())
            }
        );
    }

    #[test]
    fn both_secondaries_agree_on_one_successor() {
        assert_eq!(
            on_commit_at_secondary(&node(), 2, false),
            CommitOnSecondary::PromoteSelf
        );
        assert_eq!(
            on_commit_at_secondary(&node(), 3, false),
            CommitOnSecondary::AskSuccessor {
                successor: m(2, MemberRole::Secondary)
            }
        );
    }

    #[test]
    fn promotion_drops_the_failed_primary_and_keeps_order() {
        let n = promoted_node(&node(), &m(2, MemberRole::Secondary), Some(1));
        assert_eq!(
            n.members,
            vec![m(2, MemberRole::Primary), m(3, MemberRole::Secondary)]
        );
    }

    #[test]
    fn a_swap_puts_the_old_primary_first_in_line() {
        let n = swapped_node(&node(), 3);
        assert_eq!(
            n.members,
            vec![
                m(3, MemberRole::Primary),
                m(1, MemberRole::Secondary),
                m(2, MemberRole::Secondary)
            ]
        );
    }

    #[test]
    fn a_restarted_primary_rejoins_a_newer_epoch() {
        let mine = Epoch { term: 1, server: 1 };
        let newer = Epoch { term: 2, server: 2 };
        assert_eq!(on_restart_as_primary(mine, &[]), Startup::ServeAsPrimary);
        let same = PeerView {
            addr: "h:2".into(),
            epoch: mine,
            is_primary: false,
            names_primary: Some("h:1".into()),
        };
        assert_eq!(
            on_restart_as_primary(mine, std::slice::from_ref(&same)),
            Startup::ServeAsPrimary
        );
        let primary = PeerView {
            addr: "h:2".into(),
            epoch: newer,
            is_primary: true,
            names_primary: Some("h:2".into()),
        };
        assert_eq!(
            on_restart_as_primary(mine, &[same, primary]),
            Startup::Rejoin {
                primary: "h:2".into(),
                epoch: newer
            }
        );
        let follower = PeerView {
            addr: "h:3".into(),
            epoch: newer,
            is_primary: false,
            names_primary: None,
        };
        assert_eq!(
            on_restart_as_primary(mine, &[follower]),
            Startup::Wait { epoch: newer }
        );
    }
}
