//! The continuous-batching scheduler on the tiny checkpoint (CPU): batched,
//! chunked, preempted and prefix-cached runs must produce exactly the greedy
//! tokens each prompt produces alone. The CPU kernels are batch-invariant
//! (each output element depends only on its own token's inputs), so any
//! difference is a scheduling bug: a wrong position, block or row.

mod common;

use common::{random_ids, tiny_dir, Golden};
use model_qwen3::scheduler::{greedy, greedy_on_device, Finished, Request, SampleRow, StopReason};
use model_qwen3::{Feed, KvCache, Logits, Qwen3, Scheduler, SchedulerConfig, Sequence};
use qwen_kernels_cpu::CpuBackend;
use qwen_tensor::{Backend, HostSlice, Tensor};

fn model() -> Qwen3<CpuBackend> {
    Qwen3::load(CpuBackend::new(), &tiny_dir(), &mut |_, _| {}).expect("tiny checkpoint loads")
}

/// The greedy tokens of `ids` run alone, without the scheduler: one
/// prefill pass, then one decode step at a time.
fn alone(m: &Qwen3<CpuBackend>, ids: &[u32], steps: usize) -> Vec<u32> {
    common::greedy(m, ids, steps).0
}

fn request(prompt: &[u32], max_new: usize) -> Request {
    Request {
        prompt: prompt.to_vec(),
        max_new_tokens: max_new,
        stop_ids: Vec::new(),
    }
}

/// A cache of `blocks` blocks of 16 positions for `m`.
fn cache(m: &Qwen3<CpuBackend>, blocks: usize) -> KvCache<CpuBackend> {
    m.new_cache(blocks * 16).unwrap()
}

#[test]
fn a_batch_of_16_gives_each_prompt_its_tokens_alone() {
    let m = model();
    let vocab = m.config().vocab_size;
    let g = Golden::load();
    // Generated prompts of assorted lengths: a single token, some shorter
    // than a block, some spanning several, one longer than a step's budget;
    // then the golden prompts (one of 247 tokens).
    let mut prompts: Vec<Vec<u32>> = [1usize, 3, 15, 16, 17, 33, 40, 64, 90, 130, 150]
        .into_iter()
        .enumerate()
        .map(|(k, len)| random_ids(1000 + k as u64, len, vocab))
        .collect();
    prompts.extend(g.prompts.iter().map(|p| p.ids.clone()));
    assert_eq!(prompts.len(), 16);
    // Different lengths, so sequences finish (and leave the batch) at
    // different steps; the generated prompts, admitted first, run long
    // enough to see all 16 in one batch.
    let max_new: Vec<usize> = (0..16)
        .map(|i| if i < 11 { 30 - i } else { 24 - 2 * (i - 11) })
        .collect();
    let want: Vec<Vec<u32>> = prompts
        .iter()
        .zip(&max_new)
        .map(|(p, &n)| alone(&m, p, n))
        .collect();
    for (p, w) in g.prompts.iter().zip(&want[11..]) {
        assert_eq!(
            w[..],
            p.greedy_f32[..w.len()],
            "{}: the unscheduled path must match HF",
            p.name
        );
    }

    // A budget of 64 tokens a step: prompts are admitted a few at a time
    // and the long ones are prefilled in chunks alongside the others'
    // decoding.
    let cfg = SchedulerConfig {
        max_num_seqs: 16,
        max_num_batched_tokens: 64,
        ..Default::default()
    };
    let mut s = Scheduler::new(&m, cache(&m, 200), cfg).unwrap();
    for (p, &n) in prompts.iter().zip(&max_new) {
        s.add_request(request(p, n)).unwrap();
    }
    let be = m.backend();
    let mut pick = greedy(be);
    let mut done = Vec::new();
    let (mut mixed, mut widest) = (0, 0);
    while s.has_unfinished() {
        let out = s.step(&mut pick).unwrap();
        assert!(out.batch_tokens <= 64);
        // A step that both prefilled a chunk and produced tokens.
        if out.batch_tokens > out.batch_seqs && !out.tokens.is_empty() {
            mixed += 1;
        }
        widest = widest.max(out.batch_seqs);
        done.extend(out.finished);
    }
    done.sort_by_key(|f| f.id);
    assert!(
        mixed > 0,
        "prefill chunks never shared a step with decoding"
    );
    assert_eq!(widest, 16, "all 16 sequences ran in one batch at some step");
    assert_eq!(s.stats().preemptions, 0);
    for (f, w) in done.iter().zip(&want) {
        assert_eq!(f.tokens, *w, "request {}: batched tokens differ", f.id);
        assert_eq!(f.reason, StopReason::Length);
    }
    // Every block came back.
    assert_eq!(s.cache().free_blocks(), 200);
}

#[test]
fn a_batch_of_64_gives_each_prompt_its_tokens_alone() {
    common::batch_of_64_is_invariant(&model(), false);
}

#[test]
fn a_batch_of_64_in_overlapped_steps_gives_each_prompt_its_tokens_alone() {
    common::batch_of_64_is_invariant(&model(), true);
}

#[test]
fn preemption_leaves_greedy_output_unchanged() {
    common::preemption_leaves_greedy_output_unchanged(&model(), false, false);
}

#[test]
fn preemption_with_prefix_caching_leaves_greedy_output_unchanged() {
    common::preemption_leaves_greedy_output_unchanged(&model(), true, false);
}

#[test]
fn preemption_in_overlapped_steps_leaves_greedy_output_unchanged() {
    common::preemption_leaves_greedy_output_unchanged(&model(), false, true);
    common::preemption_leaves_greedy_output_unchanged(&model(), true, true);
}

/// Overlapped steps around stop tokens: each request that stops ends on
/// the same token as in plain steps (its extra row's token dropped), the
/// others run to their length, and every block comes back.
#[test]
fn overlapped_steps_end_on_the_stop_tokens_of_plain_steps() {
    let m = model();
    let vocab = m.config().vocab_size;
    let prompts: Vec<Vec<u32>> = (0..12)
        .map(|k| random_ids(500 + k as u64, 5 + 9 * k, vocab))
        .collect();
    let free: Vec<Vec<u32>> = prompts.iter().map(|p| alone(&m, p, 20)).collect();
    // Every third request stops on its 2nd..6th token; the others on a
    // token they never make.
    let stops: Vec<Vec<u32>> = free
        .iter()
        .enumerate()
        .map(|(k, f)| {
            if k % 3 == 0 {
                vec![f[1 + k % 5]]
            } else {
                Vec::new()
            }
        })
        .collect();
    let cfg = SchedulerConfig {
        max_num_seqs: 8,
        max_num_batched_tokens: 48,
        ..Default::default()
    };
    let run = |overlap: bool| -> (Vec<Finished>, usize, u64) {
        let mut s = Scheduler::new(&m, cache(&m, 64), cfg).unwrap();
        for (p, stop) in prompts.iter().zip(&stops) {
            s.add_request(Request {
                prompt: p.clone(),
                max_new_tokens: 20,
                stop_ids: stop.clone(),
            })
            .unwrap();
        }
        let done = if overlap {
            s.run_overlapped(&mut greedy_on_device(m.backend()))
        } else {
            s.run(&mut greedy(m.backend()))
        }
        .unwrap();
        (done, s.cache().free_blocks(), s.stats().decode_tokens)
    };
    let (plain, free_plain, decoded_plain) = run(false);
    let (overlapped, free_overlapped, decoded_overlapped) = run(true);
    assert_eq!((free_plain, free_overlapped), (64, 64));
    // The step after a stop token was already queued: one row more for
    // each of the four requests that stop.
    assert_eq!(decoded_overlapped, decoded_plain + 4);
    assert_eq!(plain.len(), 12);
    for (k, (p, o)) in plain.iter().zip(&overlapped).enumerate() {
        assert_eq!(
            (o.id, &o.tokens, o.reason),
            (p.id, &p.tokens, p.reason),
            "request {k}"
        );
        let want = if k % 3 == 0 {
            StopReason::Stop
        } else {
            StopReason::Length
        };
        assert_eq!(p.reason, want, "request {k}");
    }
}

/// Runs `a`, then (after `a_steps` steps, or once `a` finished when `None`)
/// `b`, through one scheduler.
fn two_requests(
    m: &Qwen3<CpuBackend>,
    prefix_caching: bool,
    a: &[u32],
    b: &[u32],
    a_steps: Option<usize>,
) -> (Finished, Finished, u64) {
    let cfg = SchedulerConfig {
        max_num_seqs: 4,
        max_num_batched_tokens: 256,
        prefix_caching,
    };
    let mut s = Scheduler::new(m, cache(m, 40), cfg).unwrap();
    let mut pick = greedy(m.backend());
    let mut done = Vec::new();
    s.add_request(request(a, 12)).unwrap();
    match a_steps {
        Some(n) => {
            for _ in 0..n {
                done.extend(s.step(&mut pick).unwrap().finished);
            }
        }
        None => done.extend(s.run(&mut pick).unwrap()),
    }
    s.add_request(request(b, 12)).unwrap();
    done.extend(s.run(&mut pick).unwrap());
    done.sort_by_key(|f| f.id);
    let cached = s.stats().cached_tokens;
    let mut it = done.into_iter();
    (it.next().unwrap(), it.next().unwrap(), cached)
}

#[test]
fn a_shared_48_token_prefix_is_prefilled_once() {
    let m = model();
    let vocab = m.config().vocab_size;
    let prefix = random_ids(5, 48, vocab);
    let a: Vec<u32> = prefix
        .iter()
        .copied()
        .chain(random_ids(6, 5, vocab))
        .collect();
    let b: Vec<u32> = prefix
        .iter()
        .copied()
        .chain(random_ids(7, 9, vocab))
        .collect();
    let (want_a, want_b) = (alone(&m, &a, 12), alone(&m, &b, 12));

    // b arrives while a decodes (a's blocks are held), and after a has
    // finished (its blocks are free but still named).
    for a_steps in [Some(2), None] {
        let (fa, fb, cached) = two_requests(&m, true, &a, &b, a_steps);
        assert_eq!(fa.tokens, want_a);
        assert_eq!(fb.tokens, want_b, "b on a's blocks ({a_steps:?})");
        assert_eq!(fa.prefill_tokens, 53);
        assert_eq!(fa.cached_tokens, 0);
        assert_eq!(fb.cached_tokens, 48, "{a_steps:?}");
        assert_eq!(fb.prefill_tokens, 9, "{a_steps:?}");
        assert_eq!(cached, 48);
    }

    // Without prefix caching b prefills everything, with the same tokens.
    let (fa, fb, cached) = two_requests(&m, false, &a, &b, Some(2));
    assert_eq!((fa.tokens, fb.tokens), (want_a, want_b.clone()));
    assert_eq!((fb.prefill_tokens, fb.cached_tokens, cached), (57, 0, 0));

    // A prompt that is all cached blocks still computes its last token (its
    // logits are needed): 48 tokens reuse 2 blocks and prefill 16.
    let (_, fc, _) = two_requests(&m, true, &a, &prefix, None);
    assert_eq!(fc.tokens, alone(&m, &prefix, 12));
    assert_eq!((fc.cached_tokens, fc.prefill_tokens), (32, 16));
}

#[test]
fn stop_ids_end_a_request_with_the_stop_token() {
    let m = model();
    let g = Golden::load();
    let p = &g.prompts[0];
    let stop = p.greedy_f32[4];
    let first = p.greedy_f32.iter().position(|&t| t == stop).unwrap();
    let mut s = Scheduler::new(&m, cache(&m, 16), SchedulerConfig::default()).unwrap();
    s.add_request(Request {
        prompt: p.ids.clone(),
        max_new_tokens: 24,
        stop_ids: vec![stop],
    })
    .unwrap();
    s.add_request(request(&p.ids, 3)).unwrap();
    let done = s.run(&mut greedy(m.backend())).unwrap();
    assert_eq!(done[0].reason, StopReason::Stop);
    assert_eq!(done[0].tokens, p.greedy_f32[..=first]);
    assert_eq!(done[1].reason, StopReason::Length);
    assert_eq!(done[1].tokens, p.greedy_f32[..3]);
}

#[test]
fn bad_requests_and_configs_are_refused_with_a_message() {
    let m = model();
    let mut s = Scheduler::new(&m, cache(&m, 4), SchedulerConfig::default()).unwrap();
    let vocab = m.config().vocab_size as u32;
    for (req, says) in [
        (request(&[], 4), "prompt token"),
        (request(&[1, 2], 0), "max_new_tokens"),
        (request(&[1, vocab], 4), "outside the vocabulary"),
        // 4 blocks hold 64 positions; 60 + 10 - 1 need 69.
        (request(&[1; 60], 10), "KV cache holds 64"),
        (request(&[1; 10], 5000), "max_position_embeddings"),
    ] {
        let e = s.add_request(req).unwrap_err().to_string();
        assert!(e.contains(says) && !e.contains('\n'), "{e}");
    }
    assert!(!s.has_unfinished());
    // Exactly full: 55 + 10 - 1 = 64 positions.
    s.add_request(request(&[1; 55], 10)).unwrap();
    assert_eq!(s.run(&mut greedy(m.backend())).unwrap()[0].tokens.len(), 10);

    for cfg in [
        SchedulerConfig {
            max_num_seqs: 0,
            ..Default::default()
        },
        SchedulerConfig {
            max_num_seqs: 64,
            max_num_batched_tokens: 32,
            ..Default::default()
        },
    ] {
        assert!(Scheduler::new(&m, cache(&m, 4), cfg).is_err());
    }
}

#[test]
fn a_failing_sampler_stops_the_scheduler() {
    let m = model();
    let mut s = Scheduler::new(&m, cache(&m, 8), SchedulerConfig::default()).unwrap();
    s.add_request(request(&[1, 2, 3], 4)).unwrap();
    s.add_request(request(&[4, 5], 4)).unwrap();
    // One token for two rows.
    let e = s.step(&mut |_: &mut Tensor<CpuBackend>, _: &[SampleRow<'_>]| Ok(vec![0]));
    assert!(e.unwrap_err().to_string().contains("1 tokens for 2 rows"));
    let again = s.step(&mut greedy(m.backend())).unwrap_err().to_string();
    assert!(again.contains("earlier error"), "{again}");
}

/// A batch that mixes a decoding sequence (its row is a generated token)
/// before a prompt: the layout puts prompt rows first, and `Logits::All`
/// must still come back in batch order, each row equal to the same tokens
/// run alone.
#[test]
fn logits_of_a_mixed_batch_come_back_in_batch_order() {
    use model_qwen3::{Logits, Sequence};
    let m = model();
    let vocab = m.config().vocab_size;
    let a_prompt = random_ids(91, 6, vocab);
    let b_prompt = random_ids(92, 5, vocab);
    let next = 1234u32;
    let be = m.backend();
    let rows = |t: &Tensor<CpuBackend>| be.download(t).unwrap().to_f32();

    // Alone: a's prompt then its decode token; b's prompt.
    let mut ca = cache(&m, 8);
    let mut sa = Sequence::default();
    m.forward(&mut ca, &mut [(&mut sa, &a_prompt[..])], Logits::Last)
        .unwrap();
    let a_alone = rows(
        &m.forward(&mut ca, &mut [(&mut sa, &[next][..])], Logits::All)
            .unwrap(),
    );
    let mut cb = cache(&m, 8);
    let mut sb = Sequence::default();
    let b_alone = rows(
        &m.forward(&mut cb, &mut [(&mut sb, &b_prompt[..])], Logits::All)
            .unwrap(),
    );

    // Together, the decoding sequence first in batch order.
    let mut c = cache(&m, 16);
    let (mut sa, mut sb) = (Sequence::default(), Sequence::default());
    m.forward(&mut c, &mut [(&mut sa, &a_prompt[..])], Logits::Last)
        .unwrap();
    let both = rows(
        &m.forward(
            &mut c,
            &mut [(&mut sa, &[next][..]), (&mut sb, &b_prompt[..])],
            Logits::All,
        )
        .unwrap(),
    );
    assert_eq!(both.len(), (1 + b_prompt.len()) * vocab);
    assert!(both[..vocab] == a_alone[..], "the decode row moved");
    assert!(both[vocab..] == b_alone[..], "the prompt rows moved");
    assert_eq!(sb.prompt_len(), Some(b_prompt.len()));
    assert_eq!(sa.prompt_len(), Some(a_prompt.len()));
}

/// `forward_fed` takes a one-token entry's token from a device tensor: the
/// logits of `forward` with that token on the host. A feed naming a longer
/// entry, or a token past the tensor, is an error.
#[test]
fn fed_tokens_give_the_logits_of_host_tokens() {
    let m = model();
    let be = m.backend();
    let prompt = random_ids(9, 20, m.config().vocab_size);
    let run = |fed: bool| -> Vec<f32> {
        let mut cache = m.new_cache(32).unwrap();
        let mut seq = Sequence::default();
        m.forward(&mut cache, &mut [(&mut seq, &prompt[..])], Logits::Last)
            .unwrap();
        let next = 4242u32;
        let logits = if fed {
            let tokens = be.upload(HostSlice::U32(&[7, next]), &[2]).unwrap();
            let feed = Feed {
                tokens: &tokens,
                entries: &[(0, 1)],
            };
            m.forward_fed(
                &mut cache,
                &mut [(&mut seq, &[0])],
                Logits::Last,
                Some(feed),
            )
        } else {
            m.forward(&mut cache, &mut [(&mut seq, &[next])], Logits::Last)
        }
        .unwrap();
        be.download(&logits).unwrap().to_f32()
    };
    assert_eq!(run(true), run(false));

    let mut cache = m.new_cache(32).unwrap();
    let tokens = be.upload(HostSlice::U32(&[7]), &[1]).unwrap();
    for (toks, entries) in [(&prompt[..3], [(0usize, 0usize)]), (&prompt[..1], [(0, 1)])] {
        let mut seq = Sequence::default();
        let feed = Feed {
            tokens: &tokens,
            entries: &entries,
        };
        let r = m.forward_fed(
            &mut cache,
            &mut [(&mut seq, toks)],
            Logits::Last,
            Some(feed),
        );
        assert!(
            r.is_err(),
            "{} tokens, feed {entries:?} accepted",
            toks.len()
        );
    }
}
