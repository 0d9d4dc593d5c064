//! Real-shaped bodies (from `docs/ollama-protocol.md`), cut at every byte and at random, must
//! always give the same usage and the same verdict.

use super::*;

const NATIVE_CHAT: &str = concat!(
    "{\"model\":\"llama3.2\",\"created_at\":\"2025-10-26T17:15:24.097767Z\",\"message\":{\"role\":\"assistant\",\"content\":\"The\"},\"done\":false}\n",
    "{\"model\":\"llama3.2\",\"created_at\":\"2025-10-26T17:15:24.109172Z\",\"message\":{\"role\":\"assistant\",\"content\":\" sky\"},\"done\":false}\n",
    "{\"model\":\"llama3.2\",\"created_at\":\"2025-10-26T17:15:24.421112Z\",\"message\":{\"role\":\"assistant\",\"content\":\"\"},\"done\":true,\"done_reason\":\"stop\",\"total_duration\":4883583458,\"load_duration\":1334875,\"prompt_eval_count\":26,\"prompt_eval_duration\":342546000,\"eval_count\":282,\"eval_duration\":4535599000}\n",
);

const NATIVE_GENERATE: &str = concat!(
    "{\"model\":\"llama3.2\",\"created_at\":\"2025-10-26T17:15:24Z\",\"response\":\"{\\\"eval_count\\\":1}\",\"done\":false}\n",
    "{\"model\":\"llama3.2\",\"created_at\":\"2025-10-26T17:15:25Z\",\"response\":\"\",\"done\":true,\"done_reason\":\"stop\",\"context\":[1,2,3],\"total_duration\":10706818083,\"load_duration\":6338219291,\"prompt_eval_count\":26,\"prompt_eval_duration\":130079000,\"eval_count\":259,\"eval_duration\":4232710000}\n",
);

const NATIVE_ERROR: &str = concat!(
    "{\"model\":\"llama3.2\",\"created_at\":\"2025-10-26T17:15:24Z\",\"response\":\"The\",\"done\":false}\n",
    "{\"error\":\"an error was encountered while running the model: unexpected EOF\"}\n",
);

const OPENAI_CHAT: &str = concat!(
    "data: {\"id\":\"chatcmpl-417\",\"object\":\"chat.completion.chunk\",\"created\":1761499000,\"model\":\"llama3.2\",\"system_fingerprint\":\"fp_ollama\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"The\"},\"finish_reason\":null}]}\n\n",
    "data: {\"id\":\"chatcmpl-417\",\"object\":\"chat.completion.chunk\",\"created\":1761499000,\"model\":\"llama3.2\",\"system_fingerprint\":\"fp_ollama\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" sky\"},\"finish_reason\":null}]}\n\n",
    "data: {\"id\":\"chatcmpl-417\",\"object\":\"chat.completion.chunk\",\"created\":1761499000,\"model\":\"llama3.2\",\"system_fingerprint\":\"fp_ollama\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
    "data: {\"id\":\"chatcmpl-417\",\"object\":\"chat.completion.chunk\",\"created\":1761499000,\"model\":\"llama3.2\",\"system_fingerprint\":\"fp_ollama\",\"choices\":[],\"usage\":{\"prompt_tokens\":26,\"completion_tokens\":282,\"total_tokens\":308}}\n\n",
    "data: [DONE]\n\n",
);

const OPENAI_COMPLETIONS: &str = concat!(
    "data: {\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"created\":1,\"model\":\"m\",\"choices\":[{\"text\":\"Hi\",\"index\":0,\"finish_reason\":null}],\"usage\":{\"prompt_tokens\":0,\"completion_tokens\":0,\"total_tokens\":0}}\n\n",
    "data: {\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"created\":1,\"model\":\"m\",\"choices\":[{\"text\":\"\",\"index\":0,\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":0,\"completion_tokens\":0,\"total_tokens\":0}}\n\n",
    "data: {\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"created\":1,\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":26,\"completion_tokens\":282,\"total_tokens\":308}}\n\n",
    "data: [DONE]\n\n",
);

const RESPONSES: &str = concat!(
    "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_1\",\"status\":\"in_progress\",\"usage\":null}}\n\n",
    "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"The\"}\n\n",
    "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"resp_1\",\"status\":\"completed\",\"usage\":{\"input_tokens\":26,\"output_tokens\":282,\"total_tokens\":308}}}\n\n",
);

const ANTHROPIC: &str = concat!(
    "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"usage\":{\"input_tokens\":26,\"output_tokens\":0}}}\n\n",
    "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
    "event: ping\ndata: {\"type\":\"ping\"}\n\n",
    "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"The\"}}\n\n",
    "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":282}}\n\n",
    "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
);

const CHAT_JSON: &str = "{\"id\":\"chatcmpl-417\",\"object\":\"chat.completion\",\"created\":1761499000,\"model\":\"llama3.2\",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"Hello! \\\"usage\\\":{}\"},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":26,\"completion_tokens\":8,\"total_tokens\":34}}";

fn counts(p: u64, c: u64) -> Usage {
    Usage {
        prompt: Some(p),
        completion: Some(c),
    }
}

/// Every case: body, format, expected outcome.
fn cases() -> Vec<(&'static str, String, BodyFormat, Outcome)> {
    let ok = |usage| Outcome {
        usage,
        complete: true,
        error_in_stream: false,
    };
    vec![
        (
            "native chat",
            NATIVE_CHAT.into(),
            BodyFormat::Ndjson,
            ok(counts(26, 282)),
        ),
        (
            "native generate",
            NATIVE_GENERATE.into(),
            BodyFormat::Ndjson,
            ok(counts(26, 259)),
        ),
        (
            "native in-band error",
            NATIVE_ERROR.into(),
            BodyFormat::Ndjson,
            Outcome {
                usage: Usage::default(),
                complete: false,
                error_in_stream: true,
            },
        ),
        (
            "native cut short",
            NATIVE_CHAT
                .lines()
                .take(2)
                .map(|l| format!("{l}\n"))
                .collect(),
            BodyFormat::Ndjson,
            Outcome::default(),
        ),
        (
            "openai chat",
            OPENAI_CHAT.into(),
            BodyFormat::Sse,
            ok(counts(26, 282)),
        ),
        (
            "openai chat, CRLF",
            OPENAI_CHAT.replace('\n', "\r\n"),
            BodyFormat::Sse,
            ok(counts(26, 282)),
        ),
        (
            "openai chat without usage",
            OPENAI_CHAT
                .split_inclusive("\n\n")
                .filter(|e| !e.contains("\"usage\""))
                .collect::<String>(),
            BodyFormat::Sse,
            ok(Usage::default()),
        ),
        (
            "openai chat without [DONE]",
            OPENAI_CHAT.replace("data: [DONE]\n\n", ""),
            BodyFormat::Sse,
            Outcome {
                usage: counts(26, 282),
                complete: false,
                error_in_stream: false,
            },
        ),
        (
            "openai completions",
            OPENAI_COMPLETIONS.into(),
            BodyFormat::Sse,
            ok(counts(26, 282)),
        ),
        (
            "responses",
            RESPONSES.into(),
            BodyFormat::Sse,
            ok(counts(26, 282)),
        ),
        (
            "anthropic",
            ANTHROPIC.into(),
            BodyFormat::Sse,
            ok(counts(26, 282)),
        ),
        (
            "chat json",
            CHAT_JSON.into(),
            BodyFormat::Other,
            ok(counts(26, 8)),
        ),
        (
            "native json",
            NATIVE_CHAT.lines().last().unwrap().into(),
            BodyFormat::Other,
            ok(counts(26, 282)),
        ),
        (
            "json cut short",
            CHAT_JSON[..CHAT_JSON.len() - 5].into(),
            BodyFormat::Other,
            Outcome {
                usage: counts(26, 8),
                complete: false,
                error_in_stream: false,
            },
        ),
    ]
}

fn meter(body: &[u8], format: BodyFormat, cuts: &[usize]) -> Outcome {
    let mut m = Meter::new(format);
    let mut last = 0;
    for &c in cuts {
        m.feed(&body[last..c]);
        last = c;
    }
    m.feed(&body[last..]);
    m.finish()
}

#[test]
fn whole_bodies_give_the_expected_usage() {
    for (name, body, format, expected) in cases() {
        assert_eq!(meter(body.as_bytes(), format, &[]), expected, "{name}");
    }
}

#[test]
fn every_single_cut_gives_the_same_answer() {
    for (name, body, format, expected) in cases() {
        for cut in 0..=body.len() {
            assert_eq!(
                meter(body.as_bytes(), format, &[cut]),
                expected,
                "{name}, cut at {cut}"
            );
        }
    }
}

#[test]
fn byte_by_byte_gives_the_same_answer() {
    for (name, body, format, expected) in cases() {
        let cuts: Vec<usize> = (1..body.len()).collect();
        assert_eq!(meter(body.as_bytes(), format, &cuts), expected, "{name}");
    }
}

#[test]
fn random_chunkings_give_the_same_answer() {
    // xorshift: deterministic, so a failure reproduces.
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for (name, body, format, expected) in cases() {
        for round in 0..300 {
            let pieces = (next() % 12) as usize;
            let mut cuts: Vec<usize> = (0..pieces)
                .map(|_| (next() as usize) % (body.len() + 1))
                .collect();
            cuts.sort_unstable();
            assert_eq!(
                meter(body.as_bytes(), format, &cuts),
                expected,
                "{name}, round {round}, cuts {cuts:?}"
            );
        }
    }
}

#[test]
fn several_events_in_one_chunk_and_empty_chunks_are_fine() {
    let mut m = Meter::new(BodyFormat::Sse);
    m.feed(b"");
    m.feed(OPENAI_CHAT.as_bytes());
    m.feed(b"");
    assert_eq!(m.finish().usage, counts(26, 282));
}

#[test]
fn a_stream_cut_before_its_counts_is_charged_an_estimate() {
    // Lines and events are counted the same wherever the body is cut.
    for (body, format, pieces) in [
        (NATIVE_CHAT, BodyFormat::Ndjson, 3),
        (OPENAI_CHAT, BodyFormat::Sse, 4),
        (ANTHROPIC, BodyFormat::Sse, 6),
    ] {
        for cut in 0..=body.len() {
            let mut m = Meter::new(format);
            m.feed(&body.as_bytes()[..cut]);
            m.feed(&body.as_bytes()[cut..]);
            assert_eq!(m.pieces(), pieces, "cut at {cut}");
        }
    }
    // A client leaves after two tokens, before the final counts: two tokens, plus the prompt
    // estimated from a 400-byte request body.
    let cut = NATIVE_CHAT.find("\n").unwrap() + 1;
    let second = cut + NATIVE_CHAT[cut..].find("\n").unwrap() + 1;
    let mut m = Meter::new(BodyFormat::Ndjson);
    m.feed(&NATIVE_CHAT.as_bytes()[..second + 10]);
    let outcome = m.finish();
    assert_eq!(outcome.usage, Usage::default());
    assert!(outcome.usage.is_unknown() && !m.complete());
    assert_eq!(outcome.usage.estimated(m.pieces(), 400), counts(100, 2));
    // A 4 MB base64 image is not a million tokens.
    assert_eq!(
        Usage::default().estimated(1, 4 << 20),
        counts(PROMPT_ESTIMATE_CAP, 1)
    );
    // Reported counts win over the estimate, one by one.
    assert_eq!(counts(26, 282).estimated(3, 400), counts(26, 282));
    let only_prompt = Usage {
        prompt: Some(26),
        completion: None,
    };
    assert!(!only_prompt.is_unknown());
    assert_eq!(only_prompt.estimated(3, 400), counts(26, 3));
}

#[test]
fn a_body_is_complete_once_its_end_marker_has_passed() {
    for (body, format) in [
        (NATIVE_CHAT, BodyFormat::Ndjson),
        (OPENAI_CHAT, BodyFormat::Sse),
        (CHAT_JSON, BodyFormat::Other),
    ] {
        let mut m = Meter::new(format);
        let (most, last) = body.split_at(body.len() - 3);
        m.feed(most.as_bytes());
        assert!(!m.complete() || format == BodyFormat::Ndjson, "{body}");
        m.feed(last.as_bytes());
        assert!(m.complete(), "{body}");
    }
}
