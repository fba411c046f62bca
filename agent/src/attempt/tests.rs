//! attempt tests
