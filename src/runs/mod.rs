//! Process runs: the run state ([`run`]), the expectations checked against
//! it ([`expect`]) and the tracker that owns and persists it ([`tracker`]).

pub mod compact;
pub mod expect;
pub mod linger;
pub mod run;
pub mod seen;
pub mod tracker;
