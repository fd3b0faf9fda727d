//! Client access: who is calling and what they may do. [`auth`] reads the
//! key a request presents; [`table`] knows every accepted key (from the
//! config and the [`store`]) with its policy; [`limits`] admits or refuses by
//! requests per minute and hour and tokens per day; [`ip`] limits requests
//! without a key per address; [`manage`] is what the admin API and the CLI
//! do to users and keys.

pub mod auth;
pub mod ip;
pub mod limits;
pub mod manage;
pub mod store;
pub mod table;
