//! The pipeline's stages, one module each. A stage knows nothing of Kafka.

pub mod decide;
pub mod filter;
pub mod models;
pub mod window;
