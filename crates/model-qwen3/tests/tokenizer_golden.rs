//! Checks the tokenizer and chat template against golden data produced by
//! Hugging Face (fixtures/tiny-qwen3/reference.json), and against renders of
//! the real Qwen3 template made with Python jinja2 set up as transformers
//! sets it up (trim_blocks, lstrip_blocks), for cases the fixture lacks.

use std::path::{Path, PathBuf};

use model_qwen3::chat::{ChatMessage, ChatTemplate};
use model_qwen3::tokenizer::{StreamDecoder, Tokenizer};
use model_qwen3::ModelError;
use serde::Deserialize;

#[derive(Deserialize)]
struct Reference {
    prompts: Vec<Prompt>,
    chat_messages: Vec<ChatMessage>,
}

#[derive(Deserialize)]
struct Prompt {
    name: String,
    text: String,
    ids: Vec<u32>,
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-qwen3")
}

fn reference() -> Reference {
    let path = fixture_dir().join("reference.json");
    let text = std::fs::read_to_string(&path).expect("read reference.json");
    serde_json::from_str(&text).expect("parse reference.json")
}

fn prompt<'a>(r: &'a Reference, name: &str) -> &'a Prompt {
    r.prompts
        .iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("reference.json has no prompt named {name}"))
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(&fixture_dir()).expect("load tokenizer")
}

fn template() -> ChatTemplate {
    ChatTemplate::from_dir(&fixture_dir()).expect("load chat template")
}

/// A fresh, empty scratch directory unique to this test.
fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "model-qwen3-tokenizer-golden-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn encode_matches_hf_for_every_prompt() {
    let r = reference();
    let tok = tokenizer();
    let names: Vec<&str> = r.prompts.iter().map(|p| p.name.as_str()).collect();
    for expected in ["plain", "unicode", "code", "chat", "long"] {
        assert!(names.contains(&expected), "missing prompt {expected}");
    }
    for p in &r.prompts {
        let ids = tok.encode(&p.text).unwrap();
        assert_eq!(ids, p.ids, "prompt {:?}: ids differ from HF", p.name);
    }
}

#[test]
fn special_tokens_in_text_map_to_single_ids() {
    let tok = tokenizer();
    let im_start = tok.token_id("<|im_start|>").expect("<|im_start|> in vocab");
    let im_end = tok.token_id("<|im_end|>").expect("<|im_end|> in vocab");
    let ids = tok.encode("<|im_start|>user\nhi<|im_end|>").unwrap();
    assert_eq!(ids.first(), Some(&im_start));
    assert_eq!(ids.last(), Some(&im_end));
    assert_eq!(tok.id_to_token(im_end).as_deref(), Some("<|im_end|>"));
    assert!(tok.vocab_size() > im_end as usize);
    assert_eq!(tok.token_id("definitely not a token"), None);
}

#[test]
fn chat_prompt_renders_and_encodes_like_hf() {
    let r = reference();
    let golden = prompt(&r, "chat");
    let rendered = template().render(&r.chat_messages, true, false).unwrap();
    assert_eq!(rendered, golden.text);
    assert_eq!(tokenizer().encode(&rendered).unwrap(), golden.ids);
}

#[test]
fn enable_thinking_leaves_out_the_empty_think_block() {
    let r = reference();
    let t = template();
    let no_think = t.render(&r.chat_messages, true, false).unwrap();
    let think = t.render(&r.chat_messages, true, true).unwrap();
    assert_ne!(think, no_think);
    // The template appends `<think>\n\n</think>\n\n` only when
    // enable_thinking is false; otherwise the prompt ends at the header.
    assert_eq!(
        think,
        "<|im_start|>user\nGive me a short introduction to large language models.<|im_end|>\n\
         <|im_start|>assistant\n"
    );
    assert_eq!(no_think, format!("{think}<think>\n\n</think>\n\n"));
    // Without a generation prompt the flag has nothing to act on.
    assert_eq!(
        t.render(&r.chat_messages, false, true).unwrap(),
        t.render(&r.chat_messages, false, false).unwrap()
    );
}

#[test]
fn multi_turn_matches_jinja2() {
    // Expected strings rendered by Python jinja2 3.1.6 from the fixture's
    // template with HF's settings.
    let t = template();
    let msgs = vec![
        ChatMessage::system("You are terse."),
        ChatMessage::user("Hi"),
        ChatMessage::assistant("<think>\nThe user greets.\n</think>\n\nHello!"),
        ChatMessage::user("2+2?"),
    ];
    let history = "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
                   <|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n";
    // Reasoning of earlier turns is dropped from the history.
    assert_eq!(t.render(&msgs, false, true).unwrap(), history);
    assert_eq!(
        t.render(&msgs, true, true).unwrap(),
        format!("{history}<|im_start|>assistant\n")
    );
    assert_eq!(
        t.render(&msgs, true, false).unwrap(),
        format!("{history}<|im_start|>assistant\n<think>\n\n</think>\n\n")
    );

    // ...but kept for an assistant turn after the last user query.
    assert_eq!(
        t.render(&msgs[..3], false, true).unwrap(),
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
         <|im_start|>assistant\n<think>\nThe user greets.\n</think>\n\nHello!<|im_end|>\n"
    );

    // Consecutive tool results are merged into one user turn.
    let tool_msgs = vec![
        ChatMessage::user("Weather?"),
        ChatMessage::assistant("Checking."),
        ChatMessage::new("tool", "sunny"),
        ChatMessage::new("tool", "22C"),
    ];
    assert_eq!(
        t.render(&tool_msgs, true, true).unwrap(),
        "<|im_start|>user\nWeather?<|im_end|>\n<|im_start|>assistant\nChecking.<|im_end|>\n\
         <|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\n22C\n\
         </tool_response><|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn template_helpers_behave_like_hf() {
    // Python's json.dumps(..., ensure_ascii=False) output, with and without indent.
    let t = ChatTemplate::from_template(
        r#"{{ {"a": [1, "é
", 2.5], "b": none, "c": true} | tojson }}|{{ {"a": [1], "c": {}} | tojson(indent=2) }}"#,
        None,
        None,
    )
    .unwrap();
    assert_eq!(
        t.render(&[], false, false).unwrap(),
        "{\"a\": [1, \"é\\n\", 2.5], \"b\": null, \"c\": true}|{\n  \"a\": [\n    1\n  ],\n  \"c\": {}\n}"
    );

    let t = ChatTemplate::from_template(
        "{% if tools %}tools{% endif %}{{ bos_token }}{{ eos_token }}{{ raise_exception('no way') }}",
        Some("<s>"),
        None,
    )
    .unwrap();
    let err = t.render(&[], false, false).unwrap_err();
    assert!(matches!(err, ModelError::Template(_)), "{err:?}");
    assert!(err.to_string().contains("no way"), "{err}");

    let t = ChatTemplate::from_template(
        "{% if tools %}tools{% endif %}{{ tools is defined }}{{ bos_token }}[{{ eos_token }}]",
        Some("<s>"),
        None,
    )
    .unwrap();
    assert_eq!(t.render(&[], false, false).unwrap(), "True<s>[]");

    // Block tags on their own lines leave no whitespace behind, as with
    // jinja2's trim_blocks + lstrip_blocks (expected output from jinja2).
    let t = ChatTemplate::from_template(
        "{% for m in messages %}\n  {% if m.role == \"user\" %}\nU:{{ m.content }}\n  {% endif %}\n{% endfor %}\nend",
        None,
        None,
    )
    .unwrap();
    let msgs = [ChatMessage::user("a"), ChatMessage::new("x", "b")];
    assert_eq!(t.render(&msgs, false, false).unwrap(), "U:a\nend");

    let err = ChatTemplate::from_template("{% if %}", None, None).unwrap_err();
    assert!(matches!(err, ModelError::Template(_)), "{err:?}");
}

#[test]
fn decode_round_trips() {
    let r = reference();
    let tok = tokenizer();
    for name in ["plain", "unicode", "code", "chat"] {
        let p = prompt(&r, name);
        assert_eq!(tok.decode(&p.ids).unwrap(), p.text, "prompt {name}");
    }
}

#[test]
fn stream_decoder_is_utf8_safe() {
    let r = reference();
    let tok = tokenizer();
    let p = prompt(&r, "unicode");

    // The test only means something if some character really is split
    // across tokens.
    let split_somewhere = p
        .ids
        .iter()
        .any(|&id| tok.decode(&[id]).unwrap().contains('\u{FFFD}'));
    assert!(
        split_somewhere,
        "no token of the unicode prompt splits a character"
    );

    let mut dec = StreamDecoder::new();
    let mut chunks = Vec::new();
    for &id in &p.ids {
        if let Some(chunk) = dec.push(&tok, id).unwrap() {
            chunks.push(chunk);
        }
    }
    assert_eq!(
        dec.finish(),
        None,
        "complete text must leave nothing behind"
    );
    for c in &chunks {
        assert!(
            !c.contains('\u{FFFD}'),
            "chunk {c:?} has a replacement char"
        );
    }
    assert_eq!(chunks.concat(), p.text);
    assert_eq!(chunks.concat(), tok.decode(&p.ids).unwrap());
}

#[test]
fn stream_decoder_finish_returns_held_back_text() {
    let tok = tokenizer();
    // 🫠 has no token of its own, so byte-level BPE splits it.
    let ids = tok.encode("ok 🫠").unwrap();
    // Find a cut inside the emoji: some prefix of the ids decodes with a
    // trailing replacement char.
    let cut = (1..ids.len())
        .find(|&n| tok.decode(&ids[..n]).unwrap().ends_with('\u{FFFD}'))
        .expect("the emoji spans several tokens");
    let mut dec = StreamDecoder::new();
    let mut text = String::new();
    for &id in &ids[..cut] {
        if let Some(chunk) = dec.push(&tok, id).unwrap() {
            text.push_str(&chunk);
        }
    }
    let rest = dec.finish().expect("an incomplete character is held back");
    assert!(rest.ends_with('\u{FFFD}'));
    assert_eq!(text + &rest, tok.decode(&ids[..cut]).unwrap());
    // finish resets, so the decoder can be reused.
    assert_eq!(dec.push(&tok, ids[0]).unwrap().as_deref(), Some("ok"));
}

#[test]
fn missing_dir_gives_one_line_error_naming_the_path() {
    let dir = fixture_dir().join("no-such-checkpoint");
    let err = Tokenizer::from_dir(&dir).unwrap_err();
    assert!(matches!(err, ModelError::Io { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(!msg.contains('\n'), "{msg:?}");
    assert!(
        msg.contains(&dir.join("tokenizer.json").display().to_string()),
        "{msg}"
    );

    let err = ChatTemplate::from_dir(&dir).unwrap_err();
    assert!(matches!(err, ModelError::Io { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(!msg.contains('\n'), "{msg:?}");
    assert!(
        msg.contains(&dir.join("tokenizer_config.json").display().to_string()),
        "{msg}"
    );
}

#[test]
fn bad_tokenizer_json_is_a_tokenizer_error() {
    let dir = scratch_dir("bad-tokenizer");
    std::fs::write(dir.join("tokenizer.json"), "{ not json").unwrap();
    let err = Tokenizer::from_dir(&dir).unwrap_err();
    assert!(matches!(err, ModelError::Tokenizer(_)), "{err:?}");
    let msg = err.to_string();
    assert!(!msg.contains('\n'), "{msg:?}");
    assert!(msg.contains("tokenizer.json"), "{msg}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn config_without_chat_template_is_a_template_error() {
    let dir = scratch_dir("no-template");
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"eos_token": "<|im_end|>"}"#,
    )
    .unwrap();
    let err = ChatTemplate::from_dir(&dir).unwrap_err();
    match &err {
        ModelError::Template(msg) => assert!(msg.contains("no chat_template"), "{msg}"),
        other => panic!("expected a Template error, got {other:?}"),
    }
    assert!(!err.to_string().contains('\n'));

    // A list of named templates without "default" is also rejected clearly.
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"chat_template": [{"name": "tool_use", "template": "x"}]}"#,
    )
    .unwrap();
    let err = ChatTemplate::from_dir(&dir).unwrap_err();
    assert!(matches!(err, ModelError::Template(_)), "{err:?}");
    assert!(err.to_string().contains("tool_use"), "{err}");

    // ...and "default" is picked when present.
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"chat_template": [{"name": "tool_use", "template": "x"},
            {"name": "default", "template": "{{ messages[0].content }}{{ eos_token }}"}],
            "eos_token": {"content": "</s>", "__type": "AddedToken"}}"#,
    )
    .unwrap();
    let t = ChatTemplate::from_dir(&dir).unwrap();
    assert_eq!(
        t.render(&[ChatMessage::user("hey")], false, false).unwrap(),
        "hey</s>"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
