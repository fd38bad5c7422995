//! privstack-relay: a stateless libp2p circuit relay and Kademlia bootstrap node for
//! PrivStack clients.
//!
//! [`Server::spawn`] binds the QUIC and HTTP listeners and runs the relay until
//! [`Server::shutdown`]; `main.rs` only wires the command line, logging and signals.

#![forbid(unsafe_code)]

pub mod addrs;
pub mod admission;
pub mod api;
pub mod behaviour;
pub mod build_info;
pub mod circuits;
pub mod client;
pub mod config;
pub mod defaults;
pub mod denials;
pub mod envfile;
pub mod event_loop;
pub mod external;
pub mod identity;
pub mod kademlia;
pub mod limits;
pub mod logwriter;
pub mod metrics;
pub mod notify;
pub mod offer;
pub mod probe;
pub mod quic;
pub mod record_store;
pub mod routing;
pub mod server;
pub mod settings;
pub mod state;
pub mod tables;

pub use config::{Cli, Config};
pub use server::{Server, SpawnError, Stopped};
pub use state::Stats;
