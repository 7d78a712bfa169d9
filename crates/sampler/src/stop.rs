//! When a generation ends.

/// Why a sequence stopped, in OpenAI's vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// An end-of-sequence token was generated.
    Stop,
    /// The token budget ran out.
    Length,
}

impl FinishReason {
    /// `"stop"` or `"length"`, as an OpenAI-style API reports it.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

impl std::fmt::Display for FinishReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The conditions that end one sequence's generation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StopCriteria {
    /// Tokens that end the sequence (a model may have several, e.g.
    /// `<|im_end|>` and `<|endoftext|>`).
    pub eos_token_ids: Vec<u32>,
    /// The most tokens to generate.
    pub max_new_tokens: usize,
}

impl StopCriteria {
    /// Whether generation ends after `token`, where `generated` counts the
    /// new tokens so far including `token`. An end-of-sequence token wins
    /// over the length limit when both apply.
    pub fn check(&self, token: u32, generated: usize) -> Option<FinishReason> {
        if self.eos_token_ids.contains(&token) {
            Some(FinishReason::Stop)
        } else if generated >= self.max_new_tokens {
            Some(FinishReason::Length)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eos_then_length() {
        let s = StopCriteria {
            eos_token_ids: vec![7, 9],
            max_new_tokens: 3,
        };
        assert_eq!(s.check(1, 1), None);
        assert_eq!(s.check(1, 2), None);
        assert_eq!(s.check(9, 2), Some(FinishReason::Stop));
        assert_eq!(s.check(1, 3), Some(FinishReason::Length));
        assert_eq!(s.check(7, 3), Some(FinishReason::Stop));
        assert_eq!(FinishReason::Stop.as_str(), "stop");
        assert_eq!(FinishReason::Length.to_string(), "length");
    }
}
