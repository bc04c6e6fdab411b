//! Fault points for crash tests (see [`rewind_proto::faults`]).

pub use rewind_proto::faults::point;
