//! `cim`: a GitOps reconciliation controller for NixOS fleets.
//!
//! The crate is split into a pure domain core (`spec`, `event`, `status`,
//! `queue`), the IO edges (`git`, `store`, `driver`), the runtime that wires
//! them together (`watch`, `reconcile`, `controller`) and the user-facing
//! surfaces (`api`, `client`, `render`). ARCHITECTURE.md has the map.

pub mod api;
pub mod client;
pub mod controller;
pub mod decide;
pub mod driver;
pub mod error;
pub mod event;
pub mod feed;
pub mod git;
pub mod host;
pub mod metrics;
pub mod notes;
pub mod notify;
pub mod plan;
pub mod planner;
pub mod priority;
pub mod queue;
pub mod reconcile;
pub mod render;
pub mod rollout;
pub mod simulate;
pub mod spec;
pub mod status;
pub mod store;
pub mod trust;
pub mod types;
pub mod wait;
pub mod watch;
pub mod window;
