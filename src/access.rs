//! Client access: who is calling.

pub mod auth;
