//! The error type of `slim-core`.

use std::path::PathBuf;

/// Everything that can go wrong in `slim-core`. Each variant names the thing at fault:
/// the node, the parameter, the file, or the group.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// A node could not be wired: bad inputs, incompatible shapes, a duplicate name.
    #[error("node `{node}`: {msg}")]
    Node { node: String, msg: String },
    /// A name that the graph does not contain.
    #[error("unknown node `{0}`")]
    UnknownNode(String),
    /// A parameter is missing, has the wrong shape, or is otherwise unusable.
    #[error("parameter `{name}`: {msg}")]
    Param { name: String, msg: String },
    /// A model file could not be read or written.
    #[error("{}: {msg}", path.display())]
    File { path: PathBuf, msg: String },
    /// An operating-system error on a file.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A request that cannot be honoured: a bad keep-set, a blocked group, a bad input tensor.
    #[error("{0}")]
    Invalid(String),
    /// A shared store (a study's, a service's) failed: unreachable, refused, or holding
    /// something that is not what it should be.
    #[error("{0}")]
    Store(String),
    /// An error raised by candle while computing.
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

impl CoreError {
    /// Whether the error is about what the user supplied (a file, a name, a shape, a value):
    /// exit status 2 on the command line. A failed computation or an unreachable store is not.
    pub fn is_input(&self) -> bool {
        !matches!(self, CoreError::Candle(_) | CoreError::Store(_))
    }
}

impl CoreError {
    pub(crate) fn node(node: impl Into<String>, msg: impl Into<String>) -> Self {
        CoreError::Node {
            node: node.into(),
            msg: msg.into(),
        }
    }
    pub fn param(name: impl Into<String>, msg: impl Into<String>) -> Self {
        CoreError::Param {
            name: name.into(),
            msg: msg.into(),
        }
    }
    pub(crate) fn file(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        CoreError::File {
            path: path.into(),
            msg: msg.into(),
        }
    }
}

/// The result type of `slim-core`.
pub type Result<T, E = CoreError> = std::result::Result<T, E>;
