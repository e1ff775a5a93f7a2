//! The chat suite: the real server on port 0, spoken to over real WebSockets, on SQLite and on PostgreSQL.

mod util;

mod accounts;
mod bad_input;
mod batching;
mod determinism;
mod hostile;
mod known_accounts;
mod lifecycle;
mod limits;
mod messaging;
mod name_index;
mod names;
mod revocation;
mod sessions;
mod snapshot;
mod startup;
mod throttling;
