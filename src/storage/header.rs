//! The repository header.

/// Primitive attributes of a repository, written apart from the object model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {}
