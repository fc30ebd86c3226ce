//! The async Rust client of the registry. (Being written.)
