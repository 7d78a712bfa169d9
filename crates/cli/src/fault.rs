//! Fault injection for the tests of `qwen-cli verify`: `QWEN_FAULT` names
//! one activation, and the backend under test gets that activation moved
//! by one bf16 ulp (one element) right after the op produced it, so the
//! tests can prove that `verify` notices and names it.
//!
//! Syntax: `QWEN_FAULT=[STEP.]NAME[:INDEX]`, e.g. `layers.1.attn`,
//! `decode-2.layers.0.k_cache:5`. STEP defaults to `prefill`; INDEX is the
//! flat element index in the tensor as the kernel lays it out (the paged
//! cache for `k_cache`/`v_cache`), default 0.
//!
//! Honoured only in debug builds: a release binary never perturbs its
//! numbers because of an environment variable.

use qwen_tensor::{bf16, f16, Backend, HostVec, Tensor};

/// The environment variable.
pub const VAR: &str = "QWEN_FAULT";

/// A parsed `QWEN_FAULT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub step: String,
    pub name: String,
    pub index: usize,
}

impl Fault {
    /// Parses the variable's value.
    pub fn parse(v: &str) -> Result<Fault, String> {
        let bad = || {
            format!(
                "{VAR}='{v}' is not [STEP.]NAME[:INDEX] (e.g. layers.1.attn or decode-1.logits:3)"
            )
        };
        let (spec, index) = match v.rsplit_once(':') {
            Some((s, i)) => (s, i.parse().map_err(|_| bad())?),
            None => (v, 0),
        };
        let (step, name) = match spec.split_once('.') {
            Some((s, rest)) if s == "prefill" || s.starts_with("decode-") => (s, rest),
            _ => ("prefill", spec),
        };
        if name.is_empty() {
            return Err(bad());
        }
        Ok(Fault {
            step: step.into(),
            name: name.into(),
            index,
        })
    }

    /// Reads `QWEN_FAULT` (debug builds); release builds say they ignore it.
    pub fn from_env() -> Result<Option<Fault>, String> {
        let Ok(v) = std::env::var(VAR) else {
            return Ok(None);
        };
        if cfg!(debug_assertions) {
            Fault::parse(&v).map(Some)
        } else {
            eprintln!("note: {VAR} is ignored in release builds");
            Ok(None)
        }
    }

    /// Perturbs element `self.index` of `t` by one bf16 ulp, away from zero.
    pub fn apply<B: Backend>(&self, be: &B, t: &mut Tensor<B>) -> Result<(), String> {
        let e = |e: qwen_tensor::Error| e.to_string();
        let mut host = be.download(t).map_err(e)?;
        let n = t.numel();
        let i = self.index;
        if i >= n {
            return Err(format!(
                "{VAR}: index {i} is outside {} ({n} elements)",
                self.name
            ));
        }
        // Adding to the bit pattern moves the magnitude up, for either sign:
        // one unit of a bf16 mantissa, which is bit 16 of an f32.
        match &mut host {
            HostVec::BF16(v) => v[i] = bf16::from_bits(v[i].to_bits().wrapping_add(1)),
            HostVec::F16(v) => v[i] = f16::from_bits(v[i].to_bits().wrapping_add(1 << 3)),
            HostVec::F32(v) => v[i] = f32::from_bits(v[i].to_bits().wrapping_add(1 << 16)),
            HostVec::U32(v) => v[i] ^= 1,
        }
        be.write(t, host.as_slice()).map_err(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qwen_kernels_cpu::CpuBackend;
    use qwen_tensor::HostSlice;

    #[test]
    fn parses() {
        let f = Fault::parse("layers.1.attn").unwrap();
        assert_eq!(
            (f.step.as_str(), f.name.as_str(), f.index),
            ("prefill", "layers.1.attn", 0)
        );
        let f = Fault::parse("decode-2.layers.0.k_cache:5").unwrap();
        assert_eq!(
            (f.step.as_str(), f.name.as_str(), f.index),
            ("decode-2", "layers.0.k_cache", 5)
        );
        assert_eq!(Fault::parse("logits").unwrap().name, "logits");
        assert!(Fault::parse("embed:x").is_err());
        assert!(Fault::parse("prefill.").is_err());
    }

    #[test]
    fn moves_one_bf16_ulp() {
        let cpu = CpuBackend::new();
        let f = Fault::parse("x:1").unwrap();
        let mut t = cpu.upload(HostSlice::F32(&[1.0, -2.0]), &[2]).unwrap();
        f.apply(&cpu, &mut t).unwrap();
        let HostVec::F32(v) = cpu.download(&t).unwrap() else {
            unreachable!()
        };
        assert_eq!(v, vec![1.0, -2.0 - 2.0 * 2f32.powi(-7)]);
        let mut b = cpu
            .upload(HostSlice::BF16(&[bf16::from_f32(0.0), bf16::ONE]), &[2])
            .unwrap();
        f.apply(&cpu, &mut b).unwrap();
        assert_eq!(
            cpu.download(&b).unwrap(),
            HostVec::BF16(vec![bf16::ZERO, bf16::from_f32(1.0 + 2f32.powi(-7))])
        );
        let far = Fault::parse("x:9").unwrap();
        assert!(far.apply(&cpu, &mut b).is_err());
    }
}
