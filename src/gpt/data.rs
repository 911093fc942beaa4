//! Char-level text data: a vocabulary of the text's distinct characters, a
//! 90/10 train/validation split, seeded random training batches and a fixed
//! set of validation batches.
//!
//! ```
//! use keel::gpt::data::Dataset;
//! use keel::gpt::SplitMix64;
//! let data = Dataset::tiny_shakespeare(64)?;
//! assert_eq!(data.vocab().len(), 65);
//! let mut rng = SplitMix64::new(7);
//! let batch = data.train_batch(&mut rng, 4, 64)?;
//! assert_eq!(batch.tokens.len(), 4 * 64);
//! // Targets are the tokens shifted by one.
//! assert_eq!(batch.tokens[1..64], batch.targets[..63]);
//! # Ok::<(), keel::KeelError>(())
//! ```

use std::collections::BTreeSet;
use std::path::Path;

use super::rng::SplitMix64;
use crate::error::{KeelError, Result};

/// The default corpus: Tiny Shakespeare (1,115,394 characters, 65 distinct).
pub const TINY_SHAKESPEARE: &str = include_str!("../../data/tinyshakespeare.txt");

/// Everything `reader` holds if that is at most `limit` bytes (`None` when
/// there is more).
fn read_at_most(reader: impl std::io::Read, limit: u64) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    reader
        .take(limit.saturating_add(1))
        .read_to_end(&mut bytes)?;
    Ok((bytes.len() as u64 <= limit).then_some(bytes))
}

/// A character-level vocabulary: the sorted distinct characters of a text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CharVocab {
    chars: Vec<char>,
}

impl CharVocab {
    /// The vocabulary of `text` (sorted distinct characters).
    pub fn from_text(text: &str) -> Self {
        let set: BTreeSet<char> = text.chars().collect();
        CharVocab {
            chars: set.into_iter().collect(),
        }
    }

    /// Number of characters `V`.
    pub fn len(&self) -> usize {
        self.chars.len()
    }

    /// Whether the vocabulary is empty.
    pub fn is_empty(&self) -> bool {
        self.chars.is_empty()
    }

    /// The characters, sorted (id = position).
    pub fn chars(&self) -> &[char] {
        &self.chars
    }

    /// The id of `ch`, if it is in the vocabulary.
    pub fn id(&self, ch: char) -> Option<u32> {
        self.chars.binary_search(&ch).ok().map(|i| i as u32)
    }

    /// Ids of every character of `text`; an unknown character is an error.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        text.chars()
            .map(|ch| {
                self.id(ch).ok_or_else(|| {
                    KeelError::Data(format!("character {ch:?} is not in the vocabulary"))
                })
            })
            .collect()
    }

    /// The text of `ids`; an id outside the vocabulary is an error.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        ids.iter()
            .map(|&i| {
                self.chars.get(i as usize).copied().ok_or_else(|| {
                    KeelError::Data(format!(
                        "id {i} is not below vocabulary size {}",
                        self.len()
                    ))
                })
            })
            .collect()
    }
}

/// `B` sequences of `T` tokens and their next-token targets, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Batch size `B`.
    pub batch: usize,
    /// Sequence length `T`.
    pub seq_len: usize,
    /// Input ids `[B, T]`.
    pub tokens: Vec<u32>,
    /// Target ids `[B, T]`: each token's successor in the text.
    pub targets: Vec<u32>,
}

/// An encoded text split into training (first 90%) and validation (last
/// 10%) tokens.
#[derive(Debug, Clone)]
pub struct Dataset {
    vocab: CharVocab,
    train: Vec<u32>,
    val: Vec<u32>,
}

impl Dataset {
    /// The embedded Tiny Shakespeare corpus, checked for sequences of `seq_len`.
    pub fn tiny_shakespeare(seq_len: usize) -> Result<Self> {
        Self::from_text(TINY_SHAKESPEARE, seq_len)
    }

    /// Reads a UTF-8 text file; errors name the file (missing, unreadable,
    /// not UTF-8, empty, or too short for `seq_len`).
    ///
    /// A file larger than a sixth of the memory available is a
    /// [`KeelError::Memory`] error before anything is read (the text, its
    /// encoding at 4 bytes per character and the split's copy take about 6
    /// bytes per byte of text); a pipe or a device that goes on past that
    /// size is a [`KeelError::Data`] error once the size is reached.
    pub fn from_file(path: &Path, seq_len: usize) -> Result<Self> {
        let cannot =
            |e: std::io::Error| KeelError::Data(format!("cannot read `{}`: {e}", path.display()));
        let file = std::fs::File::open(path).map_err(cannot)?;
        // The text, its ids (4 bytes per character) and the split copy.
        let available = crate::memory::available_memory();
        let limit = available.map_or(u64::MAX, |a| a / 6);
        let too_large = |text_bytes: u64| KeelError::Memory {
            what: format!("the training text `{}` and its encoding", path.display()),
            needed: text_bytes as u128 * 6,
            available,
        };
        // A regular file says its size; a pipe is read up to the limit.
        let size = file
            .metadata()
            .ok()
            .filter(|m| m.is_file())
            .map(|m| m.len());
        if let Some(size) = size.filter(|&s| s > limit) {
            return Err(too_large(size));
        }
        let bytes = read_at_most(file, limit)
            .map_err(cannot)?
            .ok_or_else(|| {
                KeelError::Data(format!(
                    "`{}` goes on past {}: with its encoding that is more than the {} of memory available",
                    path.display(),
                    crate::memory::human_bytes(limit.into()),
                    crate::memory::human_bytes(available.unwrap_or(0).into()),
                ))
            })?;
        let text = String::from_utf8(bytes)
            .map_err(|e| KeelError::Data(format!("`{}` is not UTF-8 text: {e}", path.display())))?;
        Self::from_text(&text, seq_len)
            .map_err(|e| KeelError::Data(format!("`{}`: {}", path.display(), strip(&e))))
    }

    /// Encodes `text` and splits it 90/10. Both splits must hold at least
    /// `seq_len + 1` characters, so that one sequence and its targets fit.
    pub fn from_text(text: &str, seq_len: usize) -> Result<Self> {
        if seq_len == 0 {
            return Err(KeelError::config("seq_len", "must be at least 1"));
        }
        if text.is_empty() {
            return Err(KeelError::Data("the text is empty".into()));
        }
        let vocab = CharVocab::from_text(text);
        let mut ids = vocab.encode(text)?;
        let n_train = ids.len() * 9 / 10;
        let val = ids.split_off(n_train);
        let need = seq_len.saturating_add(1);
        if ids.len() < need || val.len() < need {
            return Err(KeelError::Data(format!(
                "the text is too short: {} characters give train/val splits of {}/{}, \
                 each needs at least seq_len + 1 = {need} (at least {} characters in all)",
                ids.len() + val.len(),
                ids.len(),
                val.len(),
                need.saturating_mul(10)
            )));
        }
        Ok(Dataset {
            vocab,
            train: ids,
            val,
        })
    }

    /// The vocabulary.
    pub fn vocab(&self) -> &CharVocab {
        &self.vocab
    }

    /// Training tokens (the first 90% of the text).
    pub fn train_tokens(&self) -> &[u32] {
        &self.train
    }

    /// Validation tokens (the last 10%).
    pub fn val_tokens(&self) -> &[u32] {
        &self.val
    }

    /// Refuses a window of `t` tokens that either split is too short for
    /// (with its targets).
    pub(crate) fn check_window(&self, t: usize) -> Result<()> {
        check_fits(&self.train, t, "train")?;
        check_fits(&self.val, t, "validation")
    }

    /// A training batch of `b` windows at uniformly random offsets drawn
    /// from `rng` (the same seed gives the same batches).
    pub fn train_batch(&self, rng: &mut SplitMix64, b: usize, t: usize) -> Result<Batch> {
        check_batch(b, t)?;
        check_fits(&self.train, t, "train")?;
        let mut batch = empty_batch(b, t)?;
        let starts = (self.train.len() - t) as u64;
        for row in 0..b {
            let s = rng.below(starts) as usize;
            fill_row(&mut batch, row, &self.train[s..s + t + 1]);
        }
        Ok(batch)
    }

    /// `n` validation batches of `b` windows, fixed by the data alone:
    /// consecutive non-overlapping windows from the start of the validation
    /// split, wrapping around when it is shorter than `n * b` windows.
    pub fn val_batches(&self, n: usize, b: usize, t: usize) -> Result<Vec<Batch>> {
        check_batch(b, t)?;
        check_fits(&self.val, t, "validation")?;
        let windows = (self.val.len() - 1) / t;
        (0..n)
            .map(|k| {
                let mut batch = empty_batch(b, t)?;
                for row in 0..b {
                    let s = ((k * b + row) % windows) * t;
                    fill_row(&mut batch, row, &self.val[s..s + t + 1]);
                }
                Ok(batch)
            })
            .collect()
    }
}

/// Refuses batch dimensions of 0, or whose product overflows.
fn check_batch(b: usize, t: usize) -> Result<()> {
    if b == 0 {
        return Err(KeelError::config("batch", "must be at least 1"));
    }
    if t == 0 {
        return Err(KeelError::config("seq_len", "must be at least 1"));
    }
    if b.checked_mul(t).is_none() {
        return Err(KeelError::config(
            "batch",
            format!("{b} x {t} positions overflow"),
        ));
    }
    Ok(())
}

/// A zeroed batch of checked dimensions ([`check_batch`]).
fn empty_batch(b: usize, t: usize) -> Result<Batch> {
    let n = b * t;
    Ok(Batch {
        batch: b,
        seq_len: t,
        tokens: crate::memory::try_filled(n, 0, "a batch's tokens")?,
        targets: crate::memory::try_filled(n, 0, "a batch's targets")?,
    })
}

/// Refuses a split too short for one window of `t` tokens and its targets.
fn check_fits(split: &[u32], t: usize, name: &str) -> Result<()> {
    if split.len() <= t {
        return Err(KeelError::Data(format!(
            "the {name} split has {} tokens, fewer than seq_len + 1 = {}",
            split.len(),
            t as u128 + 1
        )));
    }
    Ok(())
}

/// Row `row` of the batch from a window of `t + 1` tokens.
fn fill_row(batch: &mut Batch, row: usize, window: &[u32]) {
    let t = batch.seq_len;
    batch.tokens[row * t..(row + 1) * t].copy_from_slice(&window[..t]);
    batch.targets[row * t..(row + 1) * t].copy_from_slice(&window[1..]);
}

/// The message of a data error without its prefix, to re-wrap it with a path.
fn strip(e: &KeelError) -> String {
    match e {
        KeelError::Data(m) => m.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reading_stops_past_the_limit() {
        let text = b"0123456789";
        assert_eq!(
            read_at_most(&text[..], 10).unwrap().as_deref(),
            Some(&text[..])
        );
        assert_eq!(read_at_most(&text[..], 9).unwrap(), None);
        assert_eq!(
            read_at_most(&text[..], u64::MAX).unwrap().unwrap().len(),
            10
        );
        // An endless reader (like /dev/zero) ends at the limit.
        assert_eq!(read_at_most(std::io::repeat(b'a'), 1 << 20).unwrap(), None);
    }
}
