//! `qwen-cli verify`: the divergence finder. Runs a prompt (prefill plus a
//! few greedy decode steps) on the backend under test with every
//! intermediate activation tapped, holds each op's output to its contract
//! against a reference, prints one table row per layer and op, and names
//! the first op, in pipeline order, that departs.
//!
//! Two references:
//! - the CPU twin (`--against cpu`, the default). Every op is re-run on the
//!   CPU *with the tested backend's own inputs*: the CPU forward pass runs
//!   in lockstep and, after comparing each of its outputs, overwrites it
//!   with the tested backend's value before the next op reads it. A
//!   departure is therefore the op's own, never drift from upstream. Exact
//!   ops must give the same bits; tensor-core GEMMs stay within
//!   [`compare::TC_FACTOR`]·Σ|x·w|. A second, independent CPU pass gives the
//!   "drift" column: how far the tested pipeline has wandered in total.
//! - an activation dump (`--against FILE`), from `verify --dump` or from
//!   `scripts/hf_dump.py` (Hugging Face transformers in f32). The tested
//!   pipeline is compared with the dump as is; ops are held to exactness
//!   when both sides are this engine without tensor cores, else to the
//!   relative bounds of [`truth_bound`].

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use model_qwen3::weights::WeightFiles;
use model_qwen3::{KvCache, Logits, ModelError, Qwen3, Sequence};
use qwen_kernels_cpu::CpuBackend;
use qwen_tensor::{bf16, Backend, DType, HostSlice, HostVec};

use crate::compare::{compare, Contract, Stats};
use crate::dumpfile::{self, Dump, Entry};
use crate::fault::Fault;

/// Ops of one decoder layer, in the order the forward pass runs them.
pub const LAYER_OPS: [&str; 9] = [
    "qkv",
    "q",
    "k_cache",
    "v_cache",
    "attn",
    "attn_residual",
    "gate_up",
    "act",
    "out",
];

/// Every activation name of a model with `layers` layers, in pipeline order.
pub fn activation_names(layers: usize) -> Vec<String> {
    let mut v = vec!["embed".to_string()];
    for l in 0..layers {
        v.extend(LAYER_OPS.iter().map(|op| format!("layers.{l}.{op}")));
    }
    v.push("logits".into());
    v
}

/// The op part of a name: `layers.3.qkv` → `qkv`, `embed` → `embed`.
fn op_of(name: &str) -> &str {
    name.rsplit('.').next().unwrap_or(name)
}

/// The layer of a name, if it is a per-layer activation.
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// The backend kernel that produces an activation (and so whose contract
/// applies to it).
pub fn kernel_of(name: &str) -> &'static str {
    match op_of(name) {
        "embed" => "embedding",
        "qkv" | "gate_up" => "rms_norm_matmul",
        "q" | "k_cache" | "v_cache" => "qk_norm_rope_store",
        "attn" => "attention",
        "attn_residual" | "out" => "matmul_add",
        "act" => "silu_mul",
        "logits" => "logits",
        _ => "?",
    }
}

/// Whether an activation comes out of a projection that may run on the
/// tensor cores.
fn is_gemm(name: &str) -> bool {
    matches!(
        op_of(name),
        "qkv" | "gate_up" | "attn_residual" | "out" | "logits"
    )
}

/// The relative-L2 bound an op is held to against a reference computed in
/// another precision (Hugging Face in f32, or this engine with tensor
/// cores). This engine keeps weights, q, k, v, the attention output and the
/// MLP activation in bf16 (relative rounding 2⁻⁹ ≈ 2e-3 per element) and
/// the residual stream in f32; 2e-2 leaves room for that rounding to
/// compound through the layers, while a wrong kernel is off by O(1).
/// The embedding is a lookup of the same bf16 weights: it must agree.
pub fn truth_bound(name: &str) -> f64 {
    match op_of(name) {
        "embed" => 1e-6,
        _ => 2e-2,
    }
}

/// One activation as the backend laid it out.
struct Raw {
    name: String,
    shape: Vec<usize>,
    data: HostVec,
}

/// One activation in the dump layout: row `r` is token position
/// `first_pos + r`. The paged caches are gathered into position order,
/// `[positions so far, kv_heads, head_dim]`, so that layouts (block size,
/// block tables) never enter a comparison.
struct Act {
    shape: Vec<usize>,
    data: HostVec,
    first_pos: usize,
}

impl Act {
    fn row_width(&self) -> usize {
        self.shape[1..].iter().product::<usize>().max(1)
    }
}

/// Copies rows `rows` of width `w` out of `v`.
fn gather(v: &HostVec, w: usize, rows: &[usize]) -> HostVec {
    fn pick<T: Copy>(x: &[T], w: usize, rows: &[usize]) -> Vec<T> {
        rows.iter()
            .flat_map(|&r| x[r * w..(r + 1) * w].iter().copied())
            .collect()
    }
    match v {
        HostVec::BF16(x) => HostVec::BF16(pick(x, w, rows)),
        HostVec::F16(x) => HostVec::F16(pick(x, w, rows)),
        HostVec::F32(x) => HostVec::F32(pick(x, w, rows)),
        HostVec::U32(x) => HostVec::U32(pick(x, w, rows)),
    }
}

/// Turns a tapped activation into the dump layout. `blocks` is the
/// sequence's block table, `len` its length after this step, `start` the
/// position of the step's first token.
fn canonical(raw: &Raw, blocks: &[u32], len: usize, start: usize) -> Act {
    if matches!(op_of(&raw.name), "k_cache" | "v_cache") && raw.shape.len() == 4 {
        let (bs, heads, dim) = (raw.shape[1], raw.shape[2], raw.shape[3]);
        let slots: Vec<usize> = (0..len)
            .map(|p| blocks[p / bs] as usize * bs + p % bs)
            .collect();
        return Act {
            shape: vec![len, heads, dim],
            data: gather(&raw.data, heads * dim, &slots),
            first_pos: 0,
        };
    }
    Act {
        shape: raw.shape.clone(),
        data: raw.data.clone(),
        first_pos: start,
    }
}

fn model_err(e: ModelError) -> String {
    e.to_string()
}

/// Runs one forward step on `model`, recording every activation (after
/// injecting `fault` where it names this step). Returns the records and
/// whether the fault was applied.
fn tapped_step<B: Backend>(
    model: &Qwen3<B>,
    cache: &mut KvCache<B>,
    seq: &mut Sequence,
    tokens: &[u32],
    step: &str,
    fault: Option<&Fault>,
) -> Result<(Vec<Raw>, bool), String> {
    let be = model.backend();
    let mut recs = Vec::new();
    let mut applied = false;
    model
        .forward_tapped(cache, &mut [(seq, tokens)], Logits::All, &mut |name, t| {
            if let Some(f) = fault.filter(|f| f.step == step && f.name == name) {
                f.apply(be, t).map_err(ModelError::Request)?;
                applied = true;
            }
            recs.push(Raw {
                name: name.to_string(),
                shape: t.shape().to_vec(),
                data: be.download(t)?,
            });
            Ok(())
        })
        .map_err(model_err)?;
    Ok((recs, applied))
}

/// Runs one forward step on the CPU twin in lockstep with `tested`: each
/// op's output is recorded, then replaced by the tested backend's value,
/// so that every op computes from exactly the inputs the tested op had.
fn lockstep_step(
    cpu: &Qwen3<CpuBackend>,
    cache: &mut KvCache<CpuBackend>,
    seq: &mut Sequence,
    tokens: &[u32],
    tested: &[Raw],
) -> Result<Vec<Raw>, String> {
    let be = cpu.backend();
    let by_name: HashMap<&str, &Raw> = tested.iter().map(|r| (r.name.as_str(), r)).collect();
    let mut recs = Vec::new();
    cpu.forward_tapped(cache, &mut [(seq, tokens)], Logits::All, &mut |name, t| {
        recs.push(Raw {
            name: name.to_string(),
            shape: t.shape().to_vec(),
            data: be.download(t)?,
        });
        let src = by_name.get(name).ok_or_else(|| {
            ModelError::Request(format!("the tested backend produced no activation {name}"))
        })?;
        be.write(t, src.data.as_slice())?;
        Ok(())
    })
    .map_err(model_err)?;
    Ok(recs)
}

/// `Σ_k |x_k·w_k|` of every output element of a tensor-core projection,
/// from the tested backend's inputs to it: the scale of its bound.
struct Magnitudes<'a> {
    files: Option<WeightFiles>,
    dir: &'a Path,
    cpu: CpuBackend,
}

impl Magnitudes<'_> {
    fn weights(&mut self) -> Result<&WeightFiles, String> {
        if self.files.is_none() {
            self.files = Some(WeightFiles::open(self.dir).map_err(model_err)?);
        }
        Ok(self.files.as_ref().expect("just opened"))
    }

    fn of(
        &mut self,
        name: &str,
        cfg: &model_qwen3::config::Qwen3Config,
        raws: &HashMap<&str, &Raw>,
    ) -> Result<Vec<f32>, String> {
        let (h, i, d) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
        let input = |n: &str| {
            raws.get(n)
                .map(|r| &r.data)
                .ok_or_else(|| format!("no activation {n} to bound {name} with"))
        };
        if name == "logits" {
            // The final norm and the vocabulary projection (the embedding
            // matrix when tied), from the last layer's output.
            let last = format!("layers.{}.out", cfg.num_hidden_layers - 1);
            let head = if cfg.tie_word_embeddings {
                "model.embed_tokens.weight"
            } else {
                "lm_head.weight"
            };
            let parts = vec![(head.to_string(), cfg.vocab_size)];
            return self.bound(
                input(&last)?,
                Some("model.norm.weight".into()),
                parts,
                h,
                cfg,
            );
        }
        let l = layer_of(name).ok_or("tensor-core op outside a layer")?;
        let (q, kv) = (cfg.num_attention_heads * d, cfg.num_key_value_heads * d);
        let p = |s: &str| format!("model.layers.{l}.{s}.weight");
        let prev = if l == 0 {
            "embed".to_string()
        } else {
            format!("layers.{}.out", l - 1)
        };
        let resid = format!("layers.{l}.attn_residual");
        // (input activation, whether it is RMS-normed first, norm weight, matrix parts, K)
        let (x, norm, parts, k): (&HostVec, Option<String>, Vec<(String, usize)>, usize) =
            match op_of(name) {
                "qkv" => (
                    input(&prev)?,
                    Some(p("input_layernorm")),
                    vec![
                        (p("self_attn.q_proj"), q),
                        (p("self_attn.k_proj"), kv),
                        (p("self_attn.v_proj"), kv),
                    ],
                    h,
                ),
                "gate_up" => (
                    input(&resid)?,
                    Some(p("post_attention_layernorm")),
                    vec![(p("mlp.gate_proj"), i), (p("mlp.up_proj"), i)],
                    h,
                ),
                "attn_residual" => (
                    input(&format!("layers.{l}.attn"))?,
                    None,
                    vec![(p("self_attn.o_proj"), h)],
                    q,
                ),
                _ => (
                    input(&format!("layers.{l}.act"))?,
                    None,
                    vec![(p("mlp.down_proj"), h)],
                    i,
                ),
            };
        self.bound(x, norm, parts, k, cfg)
    }

    /// `Σ_k |x_k·w_k|` for input `x` (RMS-normed with `norm` first, if
    /// given) against the stacked weight `parts`.
    fn bound(
        &mut self,
        x: &HostVec,
        norm: Option<String>,
        parts: Vec<(String, usize)>,
        k: usize,
        cfg: &model_qwen3::config::Qwen3Config,
    ) -> Result<Vec<f32>, String> {
        let cpu = self.cpu;
        let e = |e: qwen_tensor::Error| e.to_string();
        let t = x.to_f32().len() / k;
        let xb: Vec<bf16> = match norm {
            Some(nw) => {
                let nw = self.weights()?.f32(&nw, &[k]).map_err(model_err)?;
                let xt = cpu.upload(x.as_slice(), &[t, k]).map_err(e)?;
                let nt = cpu.upload(HostSlice::F32(&nw), &[k]).map_err(e)?;
                let mut out = cpu.zeros(&[t, k], DType::BF16).map_err(e)?;
                cpu.rms_norm(&xt, &nt, cfg.rms_norm_eps, &mut out)
                    .map_err(e)?;
                match cpu.download(&out).map_err(e)? {
                    HostVec::BF16(v) => v,
                    other => other.to_f32().into_iter().map(bf16::from_f32).collect(),
                }
            }
            None => x.to_f32().into_iter().map(bf16::from_f32).collect(),
        };
        let abs = |v: &[bf16]| -> Vec<bf16> {
            v.iter()
                .map(|b| bf16::from_bits(b.to_bits() & 0x7fff))
                .collect()
        };
        let mut w = Vec::new();
        let mut n = 0;
        for (part, rows) in &parts {
            w.extend(abs(&self
                .weights()?
                .bf16(part, &[*rows, k])
                .map_err(model_err)?));
            n += rows;
        }
        let xt = cpu.upload(HostSlice::BF16(&abs(&xb)), &[t, k]).map_err(e)?;
        let wt = cpu.upload(HostSlice::BF16(&w), &[n, k]).map_err(e)?;
        let mut out = cpu.zeros(&[t, n], DType::F32).map_err(e)?;
        cpu.matmul(&xt, &wt, &mut out).map_err(e)?;
        Ok(cpu.download(&out).map_err(e)?.to_f32())
    }
}

/// The scale of the tensor-core attention bound of activation `name`
/// (`layers.L.attn`) for every element, from the tested backend's q and
/// caches of the step (canonical: cache rows in position order), in units
/// of `TC_FACTOR` (`qwen_kernels_cpu::attention_tc_magnitudes`).
fn attention_magnitudes(
    name: &str,
    acts: &[(String, Act)],
    cfg: &model_qwen3::config::Qwen3Config,
    start: usize,
) -> Result<Vec<f32>, String> {
    let l = layer_of(name).ok_or("attention outside a layer")?;
    let get = |op: &str| {
        let n = format!("layers.{l}.{op}");
        acts.iter()
            .find(|(a, _)| *a == n)
            .map(|(_, act)| act)
            .ok_or_else(|| format!("no activation {n} to bound {name} with"))
    };
    let (q, k, v) = (get("q")?, get("k_cache")?, get("v_cache")?);
    let len = k.shape.first().copied().unwrap_or(0);
    let t = q.shape.first().copied().unwrap_or(0);
    if len < start + t || len == 0 {
        return Err(format!(
            "{name}: {len} cache rows for positions {start}..{}",
            start + t
        ));
    }
    // The canonical caches are one sequence's rows in order: one block.
    let geo = qwen_tensor::AttnGeometry {
        num_q_heads: cfg.num_attention_heads,
        num_kv_heads: cfg.num_key_value_heads,
        head_dim: cfg.head_dim,
        block_size: len,
    };
    let layout = qwen_tensor::BatchLayout {
        positions: (start..start + t).map(|p| p as u32).collect(),
        seq_of_token: vec![0; t],
        block_tables: vec![0],
        max_blocks: 1,
        block_size: len,
    };
    let scale = 1.0 / (cfg.head_dim as f32).sqrt();
    let mag = qwen_kernels_cpu::attention_tc_magnitudes(
        geo,
        &layout,
        &q.data.to_f32(),
        &k.data.to_f32(),
        &v.data.to_f32(),
        scale,
    );
    let unit = qwen_kernels_cpu::TC_ATTENTION_FACTOR / crate::compare::TC_FACTOR;
    Ok(mag.into_iter().map(|m| (m as f64 * unit) as f32).collect())
}

/// What to compare the tested backend with.
pub enum Against<'a> {
    /// The CPU twin, op by op (and as a whole pipeline for the drift column).
    Cpu(&'a Qwen3<CpuBackend>),
    /// An activation dump read from `path`.
    File { dump: Dump, path: PathBuf },
}

/// Everything `verify` needs besides the models.
pub struct Options<'a> {
    pub model_dir: &'a Path,
    /// The prompt's token ids; `None` only with a dump (its tokens are used).
    pub prompt: Option<Vec<u32>>,
    pub prompt_text: Option<String>,
    pub steps: usize,
    pub dump: Option<PathBuf>,
    /// Whether the tested backend runs prompt rows' projections on tensor
    /// cores (generated tokens always take the exact path).
    pub tensor_core_prompts: bool,
    /// Words for the tested backend in messages ("cuda (NVIDIA H100)").
    pub backend_label: String,
    pub fault: Option<Fault>,
}

/// One compared activation, for the verdict.
struct Departure {
    step: String,
    name: String,
    stats: Stats,
    contract: String,
    first_pos: usize,
    row_width: usize,
}

/// A forward step of the run: its name and the token ids it feeds.
struct Step {
    name: String,
    tokens: Vec<u32>,
}

fn step_name(k: usize) -> String {
    if k == 0 {
        "prefill".into()
    } else {
        format!("decode-{k}")
    }
}

/// Ulp distances between values of opposite sign count every float in
/// between and run to billions: printed compactly past a million.
fn fmt_ulp(u: u64) -> String {
    if u < 1_000_000 {
        u.to_string()
    } else {
        format!("{:.1e}", u as f64)
    }
}

fn fmt_num(x: f64) -> String {
    if x == 0.0 {
        "0".into()
    } else {
        format!("{x:.3e}")
    }
}

/// Argmax of the last row of a logits activation.
fn last_argmax(act: &Act) -> u32 {
    let v = act.data.to_f32();
    crate::common::argmax(&v[v.len() - act.row_width()..]) as u32
}

fn token_ids(e: &Entry) -> Vec<u32> {
    match &e.data {
        HostVec::U32(v) => v.clone(),
        other => other.to_f32().iter().map(|&x| x as u32).collect(),
    }
}

/// Runs `verify`. Prints the tables and the verdict to stdout; returns
/// whether every op held its contract. Errors are one line.
pub fn run<B: Backend>(
    tested: &Qwen3<B>,
    against: Against<'_>,
    opts: &Options<'_>,
) -> Result<bool, String> {
    let cfg = tested.config();
    let names = activation_names(cfg.num_hidden_layers);

    // The steps, and with a dump its tokens.
    let mut plan: Vec<Step> = Vec::new();
    let prompt: Vec<u32> = match (&against, &opts.prompt) {
        (Against::File { dump, path }, ours) => {
            let file_prompt = dump.tensors.get("prefill.tokens").map(token_ids).ok_or_else(|| {
                format!(
                    "{} has no prefill.tokens: not an activation dump of verify --dump or scripts/hf_dump.py",
                    path.display()
                )
            })?;
            if let Some(ours) = ours {
                if *ours != file_prompt {
                    let at = ours
                        .iter()
                        .zip(&file_prompt)
                        .position(|(a, b)| a != b)
                        .unwrap_or(ours.len().min(file_prompt.len()));
                    return Err(format!(
                        "--prompt encodes to {} tokens but the dump's prompt is {} tokens (first difference at token {at}); pass the same prompt, or none to use the dump's",
                        ours.len(),
                        file_prompt.len()
                    ));
                }
            }
            let mut k = 1;
            while k <= opts.steps {
                let Some(t) = dump.tensors.get(&format!("{}.tokens", step_name(k))) else {
                    break;
                };
                let tokens = token_ids(t);
                if tokens.len() != 1 {
                    return Err(format!(
                        "{}: {}.tokens holds {} ids; a decode step feeds one",
                        path.display(),
                        step_name(k),
                        tokens.len()
                    ));
                }
                plan.push(Step {
                    name: step_name(k),
                    tokens,
                });
                k += 1;
            }
            if k <= opts.steps {
                eprintln!(
                    "note: the dump holds {} decode step(s); verifying those",
                    k - 1
                );
            }
            file_prompt
        }
        (Against::Cpu(_), Some(p)) => {
            for k in 1..=opts.steps {
                plan.push(Step {
                    name: step_name(k),
                    tokens: Vec::new(), // chosen greedily as we go
                });
            }
            p.clone()
        }
        (Against::Cpu(_), None) => return Err("--prompt is required".into()),
    };
    if prompt.is_empty() {
        return Err("the prompt encodes to no tokens".into());
    }
    plan.insert(
        0,
        Step {
            name: "prefill".into(),
            tokens: prompt.clone(),
        },
    );
    if let Some(f) = &opts.fault {
        if !names.contains(&f.name) {
            return Err(format!(
                "{}: no activation named '{}' (names: embed, layers.N.{{{}}}, logits)",
                crate::fault::VAR,
                f.name,
                LAYER_OPS.join(",")
            ));
        }
        if !plan.iter().any(|s| s.name == f.step) {
            return Err(format!(
                "{}: step '{}' is not run (steps: prefill, decode-1..{})",
                crate::fault::VAR,
                f.step,
                plan.len() - 1
            ));
        }
    }

    let tc_any = opts.tensor_core_prompts && !prompt.is_empty();
    let positions = prompt.len() + plan.len();
    let mut cache = tested.new_cache(positions).map_err(model_err)?;
    let mut seq = Sequence::default();
    let mut cpu_state = match &against {
        Against::Cpu(cpu) => Some((
            cpu.new_cache(positions).map_err(model_err)?,
            Sequence::default(),
            cpu.new_cache(positions).map_err(model_err)?,
            Sequence::default(),
        )),
        Against::File { .. } => None,
    };
    let file_exact = match &against {
        Against::File { dump, .. } => {
            dump.metadata.get("source").map(String::as_str) == Some("qwen-rs")
                && dump.metadata.get("tensor_cores").map(String::as_str) != Some("true")
                && !tc_any
        }
        Against::Cpu(_) => true,
    };
    let mut mags = Magnitudes {
        files: None,
        dir: opts.model_dir,
        cpu: CpuBackend::new(),
    };

    // Header.
    match &against {
        Against::Cpu(_) => {
            println!(
                "verify: {} against the CPU twin, op by op: each op re-runs on the CPU from the tested backend's own inputs",
                opts.backend_label
            );
            if opts.tensor_core_prompts {
                println!(
                    "contract: exact ops must match bit for bit; the prompt's projections run on tensor cores and must stay within {:.0e}·Σ|x·w| + 1 ulp per element, its attention within 1e-5·(4·max_j a_j + 3)·Σ_j w_j|v_j| + 1 bf16 ulp (qwen_kernels_cpu::attention_tc_magnitudes)",
                    crate::compare::TC_FACTOR
                );
            } else {
                println!(
                    "contract: every op must match bit for bit (no tensor cores on this backend)"
                );
            }
            println!("drift: relative L2 distance of the tested pipeline from an independent CPU pipeline (information, no contract)");
        }
        Against::File { dump, path } => {
            let src = dump
                .metadata
                .get("source")
                .cloned()
                .unwrap_or("unknown".into());
            println!(
                "verify: {} against {} (written by {src}{})",
                opts.backend_label,
                path.display(),
                dump.metadata
                    .get("backend")
                    .map(|b| format!(" on {b}"))
                    .unwrap_or_default()
            );
            if file_exact {
                println!("contract: every op must match the dump bit for bit (same engine, no tensor cores on either side)");
            } else {
                println!("contract: relative L2 distance per op: embed <= {:.0e}, every other op <= {:.0e} (see verify::truth_bound)", truth_bound("embed"), truth_bound("logits"));
            }
        }
    }

    let mut departures: Vec<Departure> = Vec::new();
    let mut dump_out = opts.dump.as_ref().map(|_| Dump::default());
    let mut fault_applied = false;
    let mut start = 0usize;
    let mut next_token: Option<u32> = None;
    for k in 0..plan.len() {
        if k > 0 && plan[k].tokens.is_empty() {
            plan[k].tokens = vec![next_token.expect("set after each step")];
        }
        let step = &plan[k];
        let t = step.tokens.len();
        println!();
        if k == 0 {
            println!(
                "== {}: {t} tokens at positions {start}..{}",
                step.name,
                start + t - 1
            );
        } else {
            println!(
                "== {}: token {} at position {start}",
                step.name, step.tokens[0]
            );
        }

        let (raws, applied) = tapped_step(
            tested,
            &mut cache,
            &mut seq,
            &step.tokens,
            &step.name,
            opts.fault.as_ref(),
        )?;
        fault_applied |= applied;
        let len = start + t;
        let acts: Vec<(String, Act)> = raws
            .iter()
            .map(|r| (r.name.clone(), canonical(r, seq.blocks(), len, start)))
            .collect();

        // The reference activation and contract of each name.
        let mut refs: Vec<(Act, Contract, Option<f64>)> = Vec::with_capacity(acts.len());
        match (&against, cpu_state.as_mut()) {
            (Against::Cpu(cpu), Some((lcache, lseq, rcache, rseq))) => {
                let lock = lockstep_step(cpu, lcache, lseq, &step.tokens, &raws)?;
                let (indep, _) = tapped_step(cpu, rcache, rseq, &step.tokens, &step.name, None)?;
                let by_name: HashMap<&str, &Raw> =
                    raws.iter().map(|r| (r.name.as_str(), r)).collect();
                // Only the prompt's rows (step 0) run on tensor cores.
                let tc_step = opts.tensor_core_prompts && k == 0;
                for (i, (name, act)) in acts.iter().enumerate() {
                    let l = canonical(&lock[i], lseq.blocks(), len, start);
                    let r = canonical(&indep[i], rseq.blocks(), len, start);
                    if lock[i].name != *name || indep[i].name != *name {
                        return Err(format!(
                            "activation order differs between backends at {name}"
                        ));
                    }
                    let contract = if tc_step && is_gemm(name) {
                        Contract::TensorCore(mags.of(name, cfg, &by_name)?)
                    } else if tc_step && op_of(name) == "attn" {
                        Contract::TensorCoreAttention(attention_magnitudes(
                            name, &acts, cfg, start,
                        )?)
                    } else {
                        Contract::Exact
                    };
                    let drift = compare(&act.data, &r.data, &Contract::Exact).rel_l2;
                    refs.push((l, contract, Some(drift)));
                }
                next_token = Some(last_argmax(&acts.last().expect("logits").1));
                let ref_next = last_argmax(&canonical(
                    indep.last().expect("logits"),
                    rseq.blocks(),
                    len,
                    start,
                ));
                print_table(&step.name, &acts, &refs, &mut departures);
                let ours = next_token.unwrap_or(0);
                println!(
                    "next token (greedy on the tested backend): {ours}; the CPU pipeline {}",
                    if ref_next == ours {
                        "agrees".to_string()
                    } else {
                        format!("would pick {ref_next}")
                    }
                );
            }
            (Against::File { dump, path }, _) => {
                for (name, act) in &acts {
                    let key = format!("{}.{name}", step.name);
                    let e = dump
                        .tensors
                        .get(&key)
                        .ok_or_else(|| format!("{} has no tensor {key}", path.display()))?;
                    let n: usize = act.shape.iter().product();
                    if e.shape.iter().product::<usize>() != n {
                        return Err(format!(
                            "{key} in {} has shape {:?}, ours is {:?}: the dump is of another model or prompt",
                            path.display(),
                            e.shape,
                            act.shape
                        ));
                    }
                    let contract = if file_exact {
                        Contract::Exact
                    } else {
                        Contract::RelL2(truth_bound(name))
                    };
                    refs.push((
                        Act {
                            shape: act.shape.clone(),
                            data: e.data.clone(),
                            first_pos: act.first_pos,
                        },
                        contract,
                        None,
                    ));
                }
                print_table(&step.name, &acts, &refs, &mut departures);
                let ours = last_argmax(&acts.last().expect("logits").1);
                if let Some(next) = plan.get(k + 1) {
                    let theirs = next.tokens[0];
                    println!(
                        "next token in the dump: {theirs}; greedy on the tested backend {}",
                        if ours == theirs {
                            "agrees".to_string()
                        } else {
                            format!("would pick {ours} (the dump's token is fed on)")
                        }
                    );
                }
            }
            (Against::Cpu(_), None) => unreachable!("CPU state exists with a CPU reference"),
        }

        if let Some(d) = dump_out.as_mut() {
            d.tensors.insert(
                format!("{}.tokens", step.name),
                Entry {
                    shape: vec![t],
                    data: HostVec::U32(step.tokens.clone()),
                },
            );
            for (name, act) in acts {
                d.tensors.insert(
                    format!("{}.{name}", step.name),
                    Entry {
                        shape: act.shape,
                        data: act.data,
                    },
                );
            }
        }
        start += t;
    }
    if let Some(f) = &opts.fault {
        if !fault_applied {
            return Err(format!(
                "{}: {} of step {} was never produced",
                crate::fault::VAR,
                f.name,
                f.step
            ));
        }
        eprintln!(
            "note: {}={}.{}:{} perturbed the tested backend (debug build)",
            crate::fault::VAR,
            f.step,
            f.name,
            f.index
        );
    }

    if let (Some(d), Some(dir)) = (dump_out.as_mut(), &opts.dump) {
        let meta: BTreeMap<String, String> = [
            ("format", dumpfile::FORMAT.to_string()),
            ("source", "qwen-rs".to_string()),
            ("backend", tested.backend().name().to_string()),
            ("tensor_cores", tc_any.to_string()),
            ("model", opts.model_dir.display().to_string()),
            ("steps", (plan.len() - 1).to_string()),
            ("prompt", opts.prompt_text.clone().unwrap_or_default()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        d.metadata = meta;
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create --dump directory {}: {e}", dir.display()))?;
        let path = dir.join(dumpfile::FILE_NAME);
        d.write(&path)?;
        eprintln!("dumped {} tensors to {}", d.tensors.len(), path.display());
    }

    println!();
    let steps = plan.len();
    match departures.first() {
        None => {
            println!(
                "verify: PASS - all {} activations of {steps} steps within their contracts",
                names.len() * steps
            );
            Ok(true)
        }
        Some(d) => {
            let layer = layer_of(&d.name)
                .map(|l| format!(", layer {l}"))
                .unwrap_or_default();
            let worst = d.stats.worst.unwrap_or(0);
            let pos = d.first_pos + worst / d.row_width;
            println!(
                "verify: FAIL - first departure: {} ({} kernel{layer}) at {}, token position {pos} (element {} of the row): max |diff| {} ({} ulp), rel L2 {}, {} of {} elements differ; contract: {}",
                d.name,
                kernel_of(&d.name),
                d.step,
                worst % d.row_width,
                fmt_num(d.stats.max_abs),
                fmt_ulp(d.stats.max_ulp),
                fmt_num(d.stats.rel_l2),
                d.stats.differing,
                d.stats.n,
                d.contract
            );
            if departures.len() > 1 {
                println!(
                    "({} activations depart in all; rows marked DEPARTS above)",
                    departures.len()
                );
            }
            Ok(false)
        }
    }
}

/// Prints one step's table and appends its departures.
fn print_table(
    step: &str,
    acts: &[(String, Act)],
    refs: &[(Act, Contract, Option<f64>)],
    departures: &mut Vec<Departure>,
) {
    let drift = refs.iter().any(|r| r.2.is_some());
    println!(
        "{:<24} {:<14} {:>10} {:>8} {:>10} {:>17}  {:<22}{}  status",
        "activation",
        "contract",
        "max|diff|",
        "max ulp",
        "rel L2",
        "differing",
        "worst at",
        if drift { "   drift L2" } else { "" }
    );
    for ((name, act), (reference, contract, drift)) in acts.iter().zip(refs) {
        let s = compare(&act.data, &reference.data, contract);
        let w = act.row_width();
        let worst = match s.worst {
            Some(i) => format!("pos {} [{}]", act.first_pos + i / w, i % w),
            None => "-".into(),
        };
        println!(
            "{:<24} {:<14} {:>10} {:>8} {:>10} {:>17}  {:<22}{}  {}",
            name,
            contract.label(),
            fmt_num(s.max_abs),
            fmt_ulp(s.max_ulp),
            fmt_num(s.rel_l2),
            format!("{}/{}", s.differing, s.n),
            worst,
            drift.map_or(String::new(), |d| format!(" {:>10}", fmt_num(d))),
            if s.ok { "ok" } else { "DEPARTS" }
        );
        if !s.ok {
            departures.push(Departure {
                step: step.to_string(),
                name: name.clone(),
                contract: contract.label(),
                stats: s,
                first_pos: act.first_pos,
                row_width: w,
            });
        }
    }
}
