//! Support shared by this crate's integration tests (each test binary uses a part of it).
#![allow(dead_code)]

pub mod demo;
