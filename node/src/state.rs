//! The node state file, `<state-dir>/enis.json`, shared with cni-helper.
//!
//! The types, the version, the atomic save and the tolerant load live in the `eni-state`
//! crate (`node/state-contract`), which cni-helper uses too, so writer and reader cannot
//! drift. The daemon is the only writer.

pub use eni_state::{EniState, Error, FILE_NAME, StateFile, VERSION, load, path, save};
