//! The rotary-embedding table, computed once on the host and uploaded, so
//! every backend rotates with the very same cos/sin values.

/// `[max_pos, head_dim]` f32: row `p` holds `cos(p·f_i)` in its first
/// `head_dim/2` columns and `sin(p·f_i)` in the rest.
///
/// Follows Hugging Face's f32 computation step by step, because the golden
/// outputs come from it: `f_i = 1 / theta^(2i/D)` rounded to f32, the angle
/// `p·f_i` rounded to f32, then cos/sin of that f32 angle (computed in f64
/// and rounded once).
pub fn rope_table(head_dim: usize, theta: f64, max_pos: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| {
            let exponent = (2 * i) as f32 / head_dim as f32;
            1.0f32 / (theta.powf(exponent as f64) as f32)
        })
        .collect();
    let mut table = vec![0.0f32; max_pos * head_dim];
    for (p, row) in table.chunks_mut(head_dim).enumerate() {
        for (i, &f) in inv_freq.iter().enumerate() {
            let angle = (p as f32 * f) as f64;
            row[i] = angle.cos() as f32;
            row[half + i] = angle.sin() as f32;
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_rows_and_frequencies() {
        let t = rope_table(8, 1e6, 3);
        assert_eq!(&t[0..8], &[1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
        // Position 1, frequency 0 is 1 rad; the last frequency is theta^(-3/4).
        assert!((t[8] - 1f32.cos()).abs() < 1e-7);
        assert!((t[12] - 1f32.sin()).abs() < 1e-7);
        let f3 = 1e6f64.powf(-0.75);
        assert!((t[11] as f64 - f3.cos()).abs() < 1e-7);
        assert!((t[15] as f64 - f3.sin()).abs() < 1e-7);
    }
}
