//! Shared integration test support.
pub mod fake_imds;
pub mod netns;
