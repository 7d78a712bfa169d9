//! The unit tests' bit-for-bit check against the spec: the same bits, or
//! NaN on both sides (which NaN payload survives an add is not something
//! Rust or LLVM promise: they may swap its operands).

#[track_caller]
pub(crate) fn assert_same_bits(got: f32, want: f32, what: impl std::fmt::Display) {
    if want.is_nan() {
        assert!(got.is_nan(), "{what}: {got} where the spec gives NaN");
    } else {
        assert_eq!(
            got.to_bits(),
            want.to_bits(),
            "{what}: {got} against the spec's {want}"
        );
    }
}
