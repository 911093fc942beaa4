//! Char-level data.
