//! Host client.
