//! Char-level data: vocabulary, split, seeded batches, validation batches,
//! and clear errors for unusable files.

use keel::gpt::data::{CharVocab, Dataset, TINY_SHAKESPEARE};
use keel::gpt::SplitMix64;
use keel::KeelError;

#[test]
fn tiny_shakespeare_has_65_chars_and_a_90_10_split() {
    assert_eq!(TINY_SHAKESPEARE.len(), 1_115_394);
    let data = Dataset::tiny_shakespeare(64).unwrap();
    let vocab = data.vocab();
    assert_eq!(vocab.len(), 65);
    assert_eq!(vocab.chars()[0], '\n');
    assert_eq!(vocab.chars()[1], ' ');
    assert!(vocab.chars().windows(2).all(|w| w[0] < w[1]));
    let n = data.train_tokens().len() + data.val_tokens().len();
    assert_eq!(n, 1_115_394);
    assert_eq!(data.train_tokens().len(), n * 9 / 10);
    let head = vocab.decode(&data.train_tokens()[..14]).unwrap();
    assert_eq!(head, "First Citizen:");
}

#[test]
fn encode_decode_round_trip_and_unknown_chars() {
    let vocab = CharVocab::from_text("hello world");
    assert_eq!(vocab.len(), 8);
    let ids = vocab.encode("low hello").unwrap();
    assert_eq!(vocab.decode(&ids).unwrap(), "low hello");
    assert!(matches!(vocab.encode("hex"), Err(KeelError::Data(_))));
    assert!(vocab.decode(&[8]).is_err());
}

#[test]
fn train_batches_are_seeded_windows_with_shifted_targets() {
    let data = Dataset::tiny_shakespeare(32).unwrap();
    let a = data.train_batch(&mut SplitMix64::new(5), 6, 32).unwrap();
    let b = data.train_batch(&mut SplitMix64::new(5), 6, 32).unwrap();
    let c = data.train_batch(&mut SplitMix64::new(6), 6, 32).unwrap();
    assert_eq!(a, b);
    assert_ne!(a, c);
    let train = data.train_tokens();
    for row in 0..6 {
        let toks = &a.tokens[row * 32..(row + 1) * 32];
        let tgts = &a.targets[row * 32..(row + 1) * 32];
        assert_eq!(toks[1..], tgts[..31]);
        // The window comes from the training split.
        let found = train
            .windows(33)
            .any(|w| w[..32] == *toks && w[32] == tgts[31]);
        assert!(found);
    }
    // Successive draws differ.
    let mut rng = SplitMix64::new(5);
    let first = data.train_batch(&mut rng, 6, 32).unwrap();
    let second = data.train_batch(&mut rng, 6, 32).unwrap();
    assert_ne!(first, second);
}

#[test]
fn validation_batches_are_fixed_and_from_the_val_split() {
    let data = Dataset::tiny_shakespeare(64).unwrap();
    let a = data.val_batches(3, 4, 64).unwrap();
    assert_eq!(a, data.val_batches(3, 4, 64).unwrap());
    assert_eq!(a.len(), 3);
    let val = data.val_tokens();
    assert_eq!(a[0].tokens[..64], val[..64]);
    assert_eq!(a[0].targets[..64], val[1..65]);
    assert_eq!(a[1].tokens[..64], val[4 * 64..5 * 64]);
}

#[test]
fn short_text_wraps_validation_windows() {
    let text: String = (0..400).map(|i| (b'a' + (i % 7) as u8) as char).collect();
    let data = Dataset::from_text(&text, 8).unwrap();
    assert_eq!(data.val_tokens().len(), 40);
    let batches = data.val_batches(2, 5, 8).unwrap();
    // 4 windows of 8 fit in 40 tokens (plus one target): the fifth wraps.
    assert_eq!(batches[0].tokens[4 * 8..5 * 8], batches[0].tokens[..8]);
}

#[test]
fn unusable_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.txt");
    let e = Dataset::from_file(&missing, 8).unwrap_err();
    assert!(matches!(e, KeelError::Data(_)));
    assert!(e.to_string().contains("nope.txt"), "{e}");

    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let e = Dataset::from_file(&empty, 8).unwrap_err();
    assert!(e.to_string().contains("empty"), "{e}");

    let short = dir.path().join("short.txt");
    std::fs::write(&short, "to be or not to be").unwrap();
    let e = Dataset::from_file(&short, 8).unwrap_err();
    assert!(e.to_string().contains("too short"), "{e}");
    assert!(e.to_string().contains("short.txt"), "{e}");

    let binary = dir.path().join("bin.txt");
    std::fs::write(&binary, [0xffu8, 0xfe, 0x00]).unwrap();
    let e = Dataset::from_file(&binary, 8).unwrap_err();
    assert!(e.to_string().contains("UTF-8"), "{e}");

    let ok = dir.path().join("ok.txt");
    std::fs::write(&ok, "abcdefghij".repeat(20)).unwrap();
    let data = Dataset::from_file(&ok, 8).unwrap();
    assert_eq!(data.vocab().len(), 10);
    assert!(data.train_batch(&mut SplitMix64::new(1), 2, 8).is_ok());
    // A window longer than the split is an error, not a panic.
    assert!(data.val_batches(1, 1, 50).is_err());
    assert!(data.train_batch(&mut SplitMix64::new(1), 0, 8).is_err());
}

#[test]
fn splitmix_is_deterministic_and_roughly_normal() {
    let mut a = SplitMix64::new(42);
    let mut b = SplitMix64::new(42);
    assert_eq!(a.next_u64(), b.next_u64());
    let xs: Vec<f64> = (0..20_000).map(|_| a.normal()).collect();
    let mean = xs.iter().sum::<f64>() / xs.len() as f64;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
    assert!(
        mean.abs() < 0.03 && (var - 1.0).abs() < 0.05,
        "{mean} {var}"
    );
    assert!((0..1000).all(|_| a.below(7) < 7));
}

/// Batch shapes of 0, or too large to count, are errors before anything is
/// allocated or divided (a `seq_len` of 0 used to divide by zero).
#[test]
fn unusable_batch_shapes_are_errors() {
    let data = Dataset::tiny_shakespeare(16).unwrap();
    let field = |e: KeelError| match e {
        KeelError::Config { field, .. } => field,
        other => panic!("{other}"),
    };
    assert_eq!(field(data.val_batches(1, 2, 0).unwrap_err()), "seq_len");
    assert_eq!(field(data.val_batches(1, 0, 4).unwrap_err()), "batch");
    let mut rng = SplitMix64::new(1);
    assert_eq!(
        field(data.train_batch(&mut rng, 2, 0).unwrap_err()),
        "seq_len"
    );
    // b x t overflows: refused by name; a window longer than the split is
    // a data error naming the split.
    assert_eq!(
        field(data.train_batch(&mut rng, usize::MAX, 2).unwrap_err()),
        "batch"
    );
    let e = data.val_batches(1, 1, usize::MAX).unwrap_err().to_string();
    assert!(e.contains("validation split"), "{e}");
    let e = Dataset::from_text("abcdefghijklmnopqrstuvwxyz", usize::MAX)
        .unwrap_err()
        .to_string();
    assert!(e.contains("too short"), "{e}");
}
