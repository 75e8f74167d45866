//! The Linux guest agent.
